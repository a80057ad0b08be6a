//! The `ENTRYPOINT` and `CMD` of an image configuration blob, read as Go's decoder (and so
//! containerd and the kubelet) reads it.

use std::fmt;

use serde::Deserialize;

use crate::mutate::ImageCommand;

/// The `ENTRYPOINT` and `CMD` of an image configuration blob (OCI `config.Entrypoint` and
/// `config.Cmd`; Docker's are the same fields); absent or `null` ones are empty.
pub fn image_command_from_config(data: &[u8]) -> Result<ImageCommand, serde_json::Error> {
    let file: ConfigFile = serde_json::from_slice(data)?;
    let config = file.config.unwrap_or(ContainerConfig {
        entrypoint: None,
        cmd: None,
    });
    Ok(ImageCommand {
        entrypoint: config.entrypoint.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
    })
}

/// The parts of an image configuration we read.
#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default, deserialize_with = "object_or_null")]
    config: Option<ContainerConfig>,
}

/// `config` as Go's decoder reads it (and so containerd and the kubelet): an object or `null`.
/// serde's derive would also take an array for the struct, reading its fields by position, so a
/// blob the runtime refuses would give a command (found by the `image_config` fuzz target).
fn object_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ContainerConfig>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<ContainerConfig>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            ContainerConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(Some)
        }
    }
    d.deserialize_option(Visit)
}

#[derive(Debug, Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_config_is_an_object_or_null_as_go_reads_it() {
        let read = |blob: &str| image_command_from_config(blob.as_bytes());
        let command = read(r#"{"config": {"Entrypoint": ["/bin/app"], "Cmd": null}}"#).unwrap();
        assert_eq!(command.entrypoint, ["/bin/app"]);
        assert!(command.cmd.is_empty());
        for empty in [r#"{"config": null}"#, r#"{"os": "linux"}"#] {
            assert_eq!(read(empty).unwrap(), ImageCommand::default(), "{empty}");
        }
        // The fuzz target's find: an array is not a config (serde's derive read it by position).
        for bad in [
            r#"{"config": []}"#,
            r#"{"config": [["/bin/sh"]]}"#,
            r#"{"config": 1}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}

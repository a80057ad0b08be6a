//! `entrypoint install DIR`: how the tools Job fills the tools volume from an image without a shell.

use std::{
    fs::{self, File, Permissions},
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// Mode of the installed binary: everyone may run it, nobody may change it.
const MODE: u32 = 0o555;

/// Copies the running binary to `dir/entrypoint` atomically: a temporary file in `dir`, mode
/// 0555, synced, renamed over the target. A target with the same bytes and mode is left alone.
pub fn install(dir: &Path) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    fs::create_dir_all(dir)?;
    let target = dir.join("entrypoint");
    let ours = fs::read(&exe)?;
    if let Ok(md) = fs::metadata(&target)
        && md.permissions().mode() & 0o7777 == MODE
        && md.len() == ours.len() as u64
        && fs::read(&target)? == ours
    {
        return Ok(target);
    }
    let tmp = dir.join(format!(".entrypoint.{}.tmp", std::process::id()));
    let result = (|| {
        fs::write(&tmp, &ours)?;
        fs::set_permissions(&tmp, Permissions::from_mode(MODE))?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &target)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

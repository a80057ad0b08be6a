//! Kernel struct offsets from the running kernel's BTF.
//!
//! aya has no CO-RE relocations for programs written in Rust, so the kernel side reads
//! `task->files->fdt->fd[n]->f_inode->i_mode` at offsets the loader looks up here and passes in
//! as read-only globals.

use std::path::Path;

use btf_rs::{Btf, Type};
use collector_common::{KernelOffsets, syscall};

/// Where the kernel publishes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path} (needs CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("the collector's programs know the syscall ABI of x86_64 only, not {arch}")]
    Architecture { arch: &'static str },
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    Missing {
        strukt: &'static str,
        member: &'static str,
    },
}

/// The offsets the kernel side needs, from the BTF at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let off = |strukt, member| member_offset(&btf, strukt, member);
    let abi = SyscallAbi::HOST.ok_or(BtfError::Architecture {
        arch: std::env::consts::ARCH,
    })?;
    // A kernel built without io_uring has none of these, and its programs then need none.
    let uring = |strukt, member| off(strukt, member).ok();
    let (
        uring_req_file,
        uring_req_opcode,
        uring_req_res,
        uring_req_cmd,
        uring_rw_addr,
        uring_rw_len,
    ) = match (
        uring("io_kiocb", "file"),
        uring("io_kiocb", "opcode"),
        uring("io_kiocb", "cqe").zip(uring("io_cqe", "res")),
        uring("io_kiocb", "cmd"),
        uring("io_rw", "addr"),
        uring("io_rw", "len"),
    ) {
        (Some(file), Some(opcode), Some((cqe, res)), Some(cmd), Some(addr), Some(len)) => {
            (file, opcode, cqe + res, cmd, addr, len)
        }
        _ => (u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX),
    };
    Ok(KernelOffsets {
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdt_fd: off("fdtable", "fd")?,
        fdt_max_fds: off("fdtable", "max_fds")?,
        file_inode: off("file", "f_inode")?,
        inode_mode: off("inode", "i_mode")?,
        inode_ino: off("inode", "i_ino")?,
        inode_rdev: off("inode", "i_rdev")?,
        task_ti_status: off("task_struct", "thread_info")? + off("thread_info", "status")?,
        task_tgid: off("task_struct", "tgid")?,
        task_real_parent: off("task_struct", "real_parent")?,
        task_thread_pid: off("task_struct", "thread_pid")?,
        pid_level: off("pid", "level")?,
        pid_numbers: off("pid", "numbers")?,
        regs_nr: off("pt_regs", abi.regs[0])?,
        regs_arg0: off("pt_regs", abi.regs[1])?,
        regs_arg1: off("pt_regs", abi.regs[2])?,
        regs_arg2: off("pt_regs", abi.regs[3])?,
        nr: abi.nr,
        nr_compat: abi.nr_compat,
        nr_compat_sendfile: abi.nr_compat_sendfile,
        regs_compat_arg0: off("pt_regs", abi.compat_regs[0])?,
        regs_compat_arg1: off("pt_regs", abi.compat_regs[1])?,
        regs_compat_arg2: off("pt_regs", abi.compat_regs[2])?,
        uring_req_file,
        uring_req_opcode,
        uring_req_res,
        uring_req_cmd,
        uring_rw_addr,
        uring_rw_len,
    })
}

/// How the host architecture's syscall tracepoints see a native syscall: the `pt_regs` members
/// of its number and first three arguments, and the numbers of the syscalls the programs watch.
/// The programs attach to the raw `sys_exit` tracepoint, which hands them `pt_regs` as the
/// syscall entry saved them (not the per-syscall records of tracefs), so this is ABI.
struct SyscallAbi {
    regs: [&'static str; 4],
    /// Indexed by `collector_common::syscall::*`.
    nr: [u64; syscall::COUNT],
    /// A 32-bit syscall's first three arguments (its number is in `regs[0]` too).
    compat_regs: [&'static str; 3],
    nr_compat: [u64; syscall::COUNT],
    nr_compat_sendfile: u64,
}

impl SyscallAbi {
    #[cfg(target_arch = "x86_64")]
    const HOST: Option<Self> = Some(Self {
        // arch/x86/entry/entry_64.S; `orig_ax` keeps the number after `ax` took the return value.
        regs: ["orig_ax", "di", "si", "dx"],
        // arch/x86/entry/syscalls/syscall_64.tbl: write, writev, pwritev2, vmsplice, sendfile,
        // splice, tee, copy_file_range.
        nr: [1, 20, 328, 278, 40, 275, 276, 326],
        // arch/x86/entry/entry_64_compat.S and syscall_32.tbl: write, writev, pwritev2,
        // vmsplice, sendfile64, splice, tee, copy_file_range; and sendfile.
        compat_regs: ["bx", "cx", "dx"],
        nr_compat: [4, 146, 379, 316, 239, 313, 315, 377],
        nr_compat_sendfile: 187,
    });
    #[cfg(not(target_arch = "x86_64"))]
    const HOST: Option<Self> = None;
}

fn member_offset(btf: &Btf, strukt: &'static str, member: &'static str) -> Result<u64, BtfError> {
    let missing = || BtfError::Missing { strukt, member };
    let types = btf.resolve_types_by_name(strukt).map_err(|_| missing())?;
    types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => find_in(btf, s, member),
            _ => None,
        })
        .ok_or_else(missing)
}

/// Byte offset of `member` in `s`, looking into anonymous structs and unions too.
fn find_in(btf: &Btf, s: &btf_rs::Struct, member: &str) -> Option<u64> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let here = u64::from(m.bit_offset() / 8);
        if name == member {
            return Some(here);
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(off) = find_in(btf, &inner, member)
        {
            return Some(here + off);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_the_running_kernel_are_plausible() {
        if !Path::new(VMLINUX).exists() {
            println!("SKIPPED: {VMLINUX} is missing");
            return;
        }
        let o = kernel_offsets(Path::new(VMLINUX)).unwrap();
        // Members the loader needs exist, and members of one struct differ.
        assert!(o.task_files > 0, "{o:?}");
        assert_ne!(o.fdt_fd, o.fdt_max_fds);
        assert_ne!(o.inode_mode, o.inode_ino);
        assert!(o.file_inode > 0);
        // x86_64's pt_regs: r15 first, then the other registers, 8 bytes each.
        assert_eq!(
            (o.regs_arg0, o.regs_arg1, o.regs_arg2, o.regs_nr),
            (112, 104, 96, 120)
        );
        assert!(o.task_ti_status < o.task_files);
        // ebx, ecx, edx.
        assert_eq!(
            (o.regs_compat_arg0, o.regs_compat_arg1, o.regs_compat_arg2),
            (40, 88, 96)
        );
        assert_ne!(o.task_tgid, o.task_real_parent);
        // This kernel has io_uring: `file` shares the request's first word with its command
        // data, and the opcode follows them.
        assert!(o.has_io_uring(), "{o:?}");
        assert_eq!((o.uring_req_file, o.uring_req_cmd), (0, 0));
        assert!(o.uring_req_opcode > 0 && o.uring_req_res > o.uring_req_opcode);
        assert!(o.uring_rw_len > o.uring_rw_addr);
    }
}

//! Direct boot of a compressed kernel's ELF through its PVH entry point.
//!
//! A bzImage decompresses itself before the kernel runs, and under TCG (no KVM here) that
//! is most of a small guest's boot: the default guest reached READY in 9.6–13.7 s from a
//! bzImage and in 5.1 s from its own ELF, on the 2-core development machine. Most x86
//! kernels (`CONFIG_PVH`, Debian's among them) carry a Xen `PHYS32_ENTRY` note in the ELF
//! inside the bzImage, and QEMU boots such an ELF given to `-kernel` directly. So the driver
//! decompresses the payload once per kernel, with the host's own `xz`, `zstd` or `gzip`
//! (the same tools that made it), keeps the ELF (in the machine's kernel cache, or next to
//! the kernel file) and boots that. The cache is named by the kernel's content, so every
//! agent of a machine shares one unpacked copy (a fresh agent data dir would otherwise
//! decompress again: ~1.5 s of `xz` for a Debian kernel).
//!
//! The kernel comes from a tenant's image, so nothing in it is trusted: the header offsets
//! are bounds-checked, the output is capped at [`MAX_ELF`], and the ELF is used only when
//! every segment it loads lies inside the decompressed bytes and it has the PVH note. In
//! every other case (no bzImage, another codec, no note, a tool missing, a read-only
//! directory) the VM boots the bzImage as before: this only makes a boot faster.
//!
//! A live migration does not care how either end booted: a source booted from the bzImage
//! migrated to a destination started with the ELF (QEMU 10, checked by hand), so hosts can
//! be upgraded one at a time.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The largest decompressed kernel accepted (a Debian kernel's ELF is ~66 MiB).
pub const MAX_ELF: usize = 512 << 20;
/// The largest kernel file read at all.
const MAX_KERNEL: u64 = 256 << 20;

/// One extraction at a time in this process: VM tasks start in parallel, and the second
/// one then finds the first one's file. (Other processes sharing the cache directory
/// take a lock file as well.)
static EXTRACTING: Mutex<()> = Mutex::new(());

/// How a bzImage's payload is compressed (the codecs the host has tools for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// `xz` (Debian's kernels).
    Xz,
    /// `zstd`.
    Zstd,
    /// `gzip`.
    Gzip,
}

impl Codec {
    /// The host tool and its arguments that decompress stdin to stdout. `xz` is told to
    /// stop after the first stream: the kernel build appends the uncompressed size.
    fn command(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Codec::Xz => ("xz", &["-dc", "--single-stream"]),
            Codec::Zstd => ("zstd", &["-dcq"]),
            Codec::Gzip => ("gzip", &["-dcq"]),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The compressed payload of an x86 bzImage (boot protocol 2.08 or later, which records
/// where the payload is), with its codec; `None` for anything else.
pub fn bzimage_payload(bz: &[u8]) -> Option<(Codec, &[u8])> {
    if bz.get(0x202..0x206)? != b"HdrS" || u16_at(bz, 0x206)? < 0x208 {
        return None;
    }
    // The protected-mode code starts after the boot sector and `setup_sects` sectors
    // (0 means 4, for old kernels); the payload offset is relative to it.
    let setup_sects = match *bz.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1)
        .checked_mul(512)?
        .checked_add(usize::try_from(u32_at(bz, 0x248)?).ok()?)?;
    let len = usize::try_from(u32_at(bz, 0x24c)?).ok()?;
    let payload = bz.get(start..start.checked_add(len)?)?;
    let codec = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Codec::Xz
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Codec::Zstd
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        Codec::Gzip
    } else {
        return None;
    };
    Some((codec, payload))
}

/// Whether `elf` is a whole x86-64 ELF executable with a PVH entry point: little-endian
/// ELF64, `EXEC`, `x86-64`, every program header and every segment's file bytes inside
/// `elf` (a truncated decompression fails here), and a Xen note of type 18
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, what QEMU looks for) in a `PT_NOTE` segment.
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    pvh_entry(elf).is_some()
}

fn pvh_entry(elf: &[u8]) -> Option<()> {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    if elf.get(..6)? != b"\x7fELF\x02\x01" || u16_at(elf, 16)? != 2 || u16_at(elf, 18)? != 62 {
        return None;
    }
    let phoff = usize::try_from(u64_at(elf, 32)?).ok()?;
    let phentsize = usize::from(u16_at(elf, 54)?);
    let phnum = usize::from(u16_at(elf, 56)?);
    if phentsize < 56 || phnum == 0 {
        return None;
    }
    let mut pvh = false;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32_at(elf, ph)?;
        let offset = usize::try_from(u64_at(elf, ph.checked_add(8)?)?).ok()?;
        let filesz = usize::try_from(u64_at(elf, ph.checked_add(32)?)?).ok()?;
        let bytes = elf.get(offset..offset.checked_add(filesz)?)?;
        // Every segment's bytes were checked above (PT_LOAD's are the kernel itself).
        if p_type == PT_NOTE {
            pvh |= notes_have(bytes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY);
        }
    }
    pvh.then_some(())
}

/// Whether the notes in `notes` include one named `name` (with its NUL) of type `kind`.
fn notes_have(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let pad4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(t)) =
            (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
        else {
            return false;
        };
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let Some(name_end) = 12usize.checked_add(namesz) else {
            return false;
        };
        if t == kind && notes.get(12..name_end) == Some(name) {
            return true;
        }
        let next = pad4(namesz)
            .and_then(|n| n.checked_add(12))
            .and_then(|n| n.checked_add(pad4(descsz)?));
        match next.and_then(|n| notes.get(n..)) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

/// Why a kernel boots as a bzImage after all (logged, never an error of the VM's start).
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Reading the kernel or writing the ELF failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The host tool is missing, failed, or made more than [`MAX_ELF`] bytes.
    #[error("`{tool}` did not decompress the kernel: {why}")]
    Decompress {
        /// The tool.
        tool: &'static str,
        /// What went wrong.
        why: String,
    },
}

/// The kernel QEMU should be given for `kernel`: its PVH ELF (made now, or kept from an
/// earlier start) when it has one, else `kernel` itself. The ELF is kept in `cache` (a
/// directory shared by every agent of the machine, made if missing), or beside `kernel`
/// without one. Blocking: call it off the async workers.
pub fn boot_kernel(kernel: &Path, cache: Option<&Path>) -> PathBuf {
    match pvh_elf(kernel, cache) {
        Ok(Some(elf)) => elf,
        Ok(None) => kernel.to_owned(),
        Err(err) => {
            tracing::info!(kernel = %kernel.display(), error = %model::error_chain(&err), "booting the bzImage (no PVH ELF)");
            kernel.to_owned()
        }
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PvhError + 'a {
    move |err| PvhError::Io {
        action,
        path: path.to_owned(),
        err,
    }
}

/// The PVH ELF of `kernel`, kept as `<kernel's name>.<hex of its sha256>.pvh` in
/// `cache` or beside it (a kernel without one leaves an empty `.nopvh` marker, so it is
/// not decompressed at every start).
fn pvh_elf(kernel: &Path, cache: Option<&Path>) -> Result<Option<PathBuf>, PvhError> {
    let mut bz = Vec::new();
    std::fs::File::open(kernel)
        .and_then(|f| f.take(MAX_KERNEL).read_to_end(&mut bz))
        .map_err(io("read", kernel))?;
    let Some((codec, payload)) = bzimage_payload(&bz) else {
        return Ok(None);
    };
    let digest = Sha256::digest(&bz);
    // The whole digest: the cache is shared by every tenant's kernels on the machine, so a
    // kernel must not be able to pass for another one by a prefix collision.
    let tag: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let name = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = match cache {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            dir.to_owned()
        }
        None => kernel.parent().unwrap_or(Path::new(".")).to_owned(),
    };
    let elf_path = dir.join(format!("{name}.{tag}.pvh"));
    let none_path = dir.join(format!("{name}.{tag}.nopvh"));
    let _one = EXTRACTING.lock().unwrap_or_else(|p| p.into_inner());
    // Agents of one machine share the cache: the first unpacks, the others wait for it.
    let lock_path = dir.join(format!("{name}.{tag}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io("create", &lock_path))?;
    lock.lock().map_err(io("lock", &lock_path))?;
    if elf_path.exists() {
        return Ok(Some(elf_path));
    }
    if none_path.exists() {
        return Ok(None);
    }
    let elf = decompress(codec, payload)?;
    if !has_pvh_entry(&elf) {
        std::fs::write(&none_path, b"").map_err(io("write", &none_path))?;
        return Ok(None);
    }
    // Written whole under a temporary name, then renamed: a crash leaves no half ELF.
    let tmp = dir.join(format!("{name}.{tag}.pvh.tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&elf).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &elf_path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(PvhError::Io {
            action: "write",
            path: elf_path,
            err,
        });
    }
    tracing::info!(kernel = %kernel.display(), elf = %elf_path.display(), bytes = elf.len(), "kernel unpacked for PVH boot");
    Ok(Some(elf_path))
}

/// Runs the codec's host tool over `payload`, keeping at most [`MAX_ELF`] bytes. Its exit
/// status is not used: `zstd` and `gzip` complain about the size the kernel build appends
/// after the stream; [`has_pvh_entry`] checks that what came out is whole.
fn decompress(codec: Codec, payload: &[u8]) -> Result<Vec<u8>, PvhError> {
    let (tool, args) = codec.command();
    let fail = |why: String| PvhError::Decompress { tool, why };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail("no pipes".into()));
    };
    let mut out = Vec::new();
    let read = std::thread::scope(|s| {
        // The writer runs beside the reader: a tool that fills its stdout pipe before it
        // has read all its input would otherwise wait for us forever.
        s.spawn(move || {
            let _ = stdin.write_all(payload);
        });
        stdout.take(MAX_ELF as u64 + 1).read_to_end(&mut out)
    });
    let _ = child.kill();
    let _ = child.wait();
    read.map_err(|e| fail(format!("reading its output: {e}")))?;
    if out.len() > MAX_ELF {
        return Err(fail(format!("more than {MAX_ELF} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 executable: one PT_NOTE with `notes` and one PT_LOAD of
    /// `load` bytes after it.
    fn elf(notes: &[u8], load: usize) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 2 * 56];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&2u16.to_le_bytes());
        let notes_at = e.len() as u64;
        let load_at = notes_at + notes.len() as u64;
        let ph = |e: &mut Vec<u8>, i: usize, t: u32, off: u64, sz: u64| {
            let p = 64 + i * 56;
            e[p..p + 4].copy_from_slice(&t.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&sz.to_le_bytes());
        };
        ph(&mut e, 0, 4, notes_at, notes.len() as u64);
        ph(&mut e, 1, 1, load_at, load as u64);
        e.extend_from_slice(notes);
        e.extend(std::iter::repeat_n(0x90, load));
        e
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend((desc.len() as u32).to_le_bytes());
        n.extend(kind.to_le_bytes());
        n.extend(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn the_pvh_note_is_found_among_other_notes_and_only_in_a_whole_elf() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(b"Xen\0", 18, &0x100_0000u32.to_le_bytes()));
        let good = elf(&notes, 4096);
        assert!(has_pvh_entry(&good));
        // A truncated decompression: the loaded segment runs past the end.
        assert!(!has_pvh_entry(&good[..good.len() - 1]));
        // Xen notes of other types only, or the type under another name.
        assert!(!has_pvh_entry(&elf(&note(b"Xen\0", 6, b"linux\0"), 16)));
        assert!(!has_pvh_entry(&elf(&note(b"Xem\0", 18, &[0; 4]), 16)));
        // Not x86-64, not an executable, not ELF64.
        for (at, v) in [(18, 40u8), (16, 3), (4, 1)] {
            let mut e = good.clone();
            e[at] = v;
            assert!(!has_pvh_entry(&e), "byte {at} = {v}");
        }
        assert!(!has_pvh_entry(b""));
    }

    #[test]
    fn broken_notes_end_the_search_without_a_panic() {
        let mut n = note(b"Xen\0", 18, &[0; 4]);
        n[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!notes_have(&n, b"Xen\0", 18));
        let mut n = note(b"GNU\0", 3, &[0; 4]);
        n[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        n.extend(note(b"Xen\0", 18, &[0; 4]));
        assert!(!notes_have(&n, b"Xen\0", 18));
    }

    fn bzimage(setup_sects: u8, version: u16, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            usize::from(setup_sects)
        };
        let mut bz = vec![0u8; (sects + 1) * 512 + 100];
        bz[0x1f1] = setup_sects;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend_from_slice(payload);
        bz
    }

    #[test]
    fn the_payload_is_where_the_setup_header_says_with_its_codec() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2];
        let bz = bzimage(30, 0x20f, &xz);
        assert_eq!(bzimage_payload(&bz), Some((Codec::Xz, &xz[..])));
        let zst = [0x28, 0xb5, 0x2f, 0xfd, 9];
        assert_eq!(
            bzimage_payload(&bzimage(0, 0x20f, &zst)),
            Some((Codec::Zstd, &zst[..]))
        );
        // Before boot protocol 2.08 the header does not say where the payload is.
        assert_eq!(bzimage_payload(&bzimage(30, 0x207, &xz)), None);
        // An unknown codec (lzma, bzip2, lz4 ...) and a payload past the end of the file.
        assert_eq!(bzimage_payload(&bzimage(30, 0x20f, b"BZh91AY")), None);
        let bz = bzimage(30, 0x20f, &xz);
        assert_eq!(bzimage_payload(&bz[..bz.len() - 1]), None);
        assert_eq!(bzimage_payload(b"HdrS"), None);
    }

    /// `data` compressed by the host's gzip, followed by its length as the kernel build
    /// appends it.
    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip (Debian package gzip) is needed");
        gz.stdin.take().unwrap().write_all(data).unwrap();
        let mut out = gz.wait_with_output().unwrap().stdout;
        out.extend((data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn a_gzip_payload_is_unpacked_by_the_host_tool_and_kept_beside_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let image = elf(&note(b"Xen\0", 18, &[0; 4]), 8192);
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, bzimage(30, 0x20f, &gzip(&image))).unwrap();
        let booted = boot_kernel(&kernel, None);
        assert_ne!(booted, kernel);
        assert_eq!(std::fs::read(&booted).unwrap(), image);
        // Kept: the next start boots the same file.
        assert_eq!(boot_kernel(&kernel, None), booted);

        // No PVH note: the bzImage boots, and a marker says so for the next start.
        let plain = elf(&note(b"GNU\0", 3, &[0; 4]), 16);
        let other = dir.path().join("other");
        std::fs::write(&other, bzimage(30, 0x20f, &gzip(&plain))).unwrap();
        assert_eq!(boot_kernel(&other, None), other);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("other.") && n.ends_with(".nopvh")),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
    }

    #[test]
    fn agents_with_a_shared_cache_unpack_a_kernel_once() {
        let dir = tempfile::tempdir().unwrap();
        let image = elf(&note(b"Xen\0", 18, &[0; 4]), 8192);
        let cache = dir.path().join("kernels");
        // The same kernel fetched into two agents' data dirs.
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut booted = Vec::new();
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            let kernel = d.join("vmlinuz");
            std::fs::write(&kernel, bzimage(30, 0x20f, &gzip(&image))).unwrap();
            booted.push(boot_kernel(&kernel, Some(&cache)));
        }
        assert_eq!(booted[0], booted[1]);
        assert_eq!(booted[0].parent(), Some(cache.as_path()));
        assert_eq!(std::fs::read(&booted[0]).unwrap(), image);
        for d in [&a, &b] {
            assert_eq!(
                std::fs::read_dir(d).unwrap().count(),
                1,
                "only the kernel in {d:?}"
            );
        }
        // A different kernel of the same name gets its own ELF.
        let image2 = elf(&note(b"Xen\0", 18, &[1; 4]), 8192);
        let c = dir.path().join("c");
        std::fs::create_dir(&c).unwrap();
        std::fs::write(c.join("vmlinuz"), bzimage(30, 0x20f, &gzip(&image2))).unwrap();
        let other = boot_kernel(&c.join("vmlinuz"), Some(&cache));
        assert_ne!(other, booted[0]);
        assert_eq!(std::fs::read(&other).unwrap(), image2);
    }
}

//! [`FileDevice`]: a [`BlockDevice`] over a regular file (or block device node).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{BlockDevice, NbdError};

/// A file exported as a disk: `pread`/`pwrite` at the request offset (no lock, no
/// seek, so connections and threads share it freely), `fdatasync` for flush and
/// FUA, `fallocate(PUNCH_HOLE)` for trim and `fallocate(ZERO_RANGE)` for write
/// zeroes where the file system supports them.
///
/// The size is read once at open: the file must not be truncated while exported.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileDevice {
    /// Opens `path`, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<FileDevice, NbdError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |err| NbdError::Open {
            path: path.clone(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            // A block device node reports 0 in metadata: ask by seeking to the end.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0)).map_err(open_err)?
        };
        Ok(FileDevice {
            file,
            path,
            size,
            read_only,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Trim is advisory: a file system without hole punching keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {
                if fua {
                    self.file.sync_data()?;
                }
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Same as the trait's default, which we cannot call from an override.
                const CHUNK: u64 = 1 << 20;
                let zeroes = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(1 << 20)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let n = usize::try_from(n).unwrap_or(zeroes.len());
                    self.file.write_all_at(&zeroes[..n], offset + done)?;
                    done += n as u64;
                }
                if fua {
                    self.file.sync_data()?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// `fallocate(2)` on `file`.
#[allow(unsafe_code)]
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: fallocate takes only integers; the descriptor is open for as long
        // as `file` is borrowed, and no memory is passed to the kernel.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_trim_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let dev = FileDevice::open(&path, false).unwrap();
        assert_eq!(dev.size(), 1 << 16);
        dev.write_at(&[1, 2, 3], 10, true).unwrap();
        let mut b = [0u8; 5];
        dev.read_at(&mut b, 9).unwrap();
        assert_eq!(b, [7, 1, 2, 3, 7]);
        dev.write_zeroes(0, 8192, false).unwrap();
        dev.read_at(&mut b, 4000).unwrap();
        assert_eq!(b, [0; 5]);
        dev.trim(8192, 4096).unwrap();
        dev.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 16);

        let ro = FileDevice::open(&path, true).unwrap();
        assert!(ro.read_only());
        assert!(ro.write_at(&[1], 0, false).is_err());
    }

    #[test]
    fn open_missing_names_the_path() {
        let err = FileDevice::open("/nonexistent/x.raw", true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.raw"));
    }
}

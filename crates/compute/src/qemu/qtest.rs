//! QEMU's qtest protocol, enough to read what reaches a VM's devices without a guest:
//! a VM whose firmware only halts ([`write_halting_firmware`]) and a qtest socket, read
//! with [`Qtest::inb`]; [`Qtest::drain_i8042`] takes every byte waiting in the PS/2
//! controller (the keyboard's scancodes, in order).
//!
//! The protocol is one line per command (`inb 0x64`) and one answer line (`OK 0x0019`,
//! or `FAIL ...`/`ERR ...`); QEMU may also send `IRQ ...` lines, which are skipped. Start
//! QEMU with `-qtest unix:PATH,server=on,wait=off -qtest-log /dev/null` (without the log
//! option QEMU writes every exchange to its stderr).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Size of [`write_halting_firmware`]'s image: the smallest BIOS QEMU's `pc` and `q35`
/// machines map (at the top of the first MiB and of 4 GiB).
pub const HALTING_FIRMWARE_BYTES: usize = 64 * 1024;

/// The i8042 status port: bit 0 says a byte waits at [`I8042_DATA`], bit 5 that it comes
/// from the auxiliary (mouse) port.
pub const I8042_STATUS: u16 = 0x64;
/// The i8042 data port.
pub const I8042_DATA: u16 = 0x60;

/// Most bytes [`Qtest::drain_i8042`] reads at once: far above the 16 the keyboard queues,
/// so a controller that never empties is an error, not a hang.
const MAX_DRAIN: usize = 256;

/// Why a qtest exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QtestError {
    /// The socket could not be reached, or reading or writing it failed.
    #[error("qtest socket {what}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// QEMU closed the connection (it exited).
    #[error("qtest connection closed while waiting for the answer to {command:?}")]
    Closed {
        /// The command sent.
        command: String,
    },
    /// An answer other than `OK`.
    #[error("qtest command {command:?} answered {answer:?}")]
    Refused {
        /// The command sent.
        command: String,
        /// QEMU's line.
        answer: String,
    },
    /// No answer in time.
    #[error("qtest command {command:?} got no answer within {timeout:?}")]
    Timeout {
        /// The command sent.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The controller kept reporting data.
    #[error("the i8042 still had data after {MAX_DRAIN} bytes")]
    Endless,
}

/// Writes a firmware image that halts at once: [`HALTING_FIRMWARE_BYTES`] of `hlt`
/// (0xF4). The CPU starts at the reset vector with interrupts off, so no interrupt ever
/// wakes it: the guest never touches a device, and what a test reads there is only what
/// the host sent.
pub fn write_halting_firmware(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, vec![0xf4u8; HALTING_FIRMWARE_BYTES])
}

/// One qtest connection.
#[derive(Debug)]
pub struct Qtest {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    timeout: Duration,
}

impl Qtest {
    /// Connects to a qtest socket QEMU listens on, retrying while it does not exist yet,
    /// for up to `timeout` (also the time each command may take).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qtest, QtestError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(err) if tokio::time::Instant::now() >= deadline => {
                    return Err(QtestError::Io {
                        what: format!("{} cannot be connected", path.display()),
                        err,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (rd, wr) = stream.into_split();
        Ok(Qtest {
            rd: BufReader::new(rd),
            wr,
            timeout,
        })
    }

    /// Sends one command line and returns QEMU's `OK` answer (without `OK`).
    pub async fn command(&mut self, command: &str) -> Result<String, QtestError> {
        let io = |what: &str, err| QtestError::Io {
            what: what.to_owned(),
            err,
        };
        self.wr
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| io("write", e))?;
        let answer = tokio::time::timeout(self.timeout, async {
            let mut line = String::new();
            loop {
                line.clear();
                let n = self
                    .rd
                    .read_line(&mut line)
                    .await
                    .map_err(|e| io("read", e))?;
                if n == 0 {
                    return Err(QtestError::Closed {
                        command: command.to_owned(),
                    });
                }
                let l = line.trim();
                // Interrupt notifications (with irq_intercept) are not answers.
                if l.starts_with("OK") || l.starts_with("FAIL") || l.starts_with("ERR") {
                    return Ok(l.to_owned());
                }
            }
        })
        .await
        .map_err(|_| QtestError::Timeout {
            command: command.to_owned(),
            timeout: self.timeout,
        })??;
        match answer.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => Err(QtestError::Refused {
                command: command.to_owned(),
                answer,
            }),
        }
    }

    /// Reads one byte from an I/O port.
    pub async fn inb(&mut self, port: u16) -> Result<u8, QtestError> {
        let command = format!("inb 0x{port:x}");
        let v = self.command(&command).await?;
        // `OK 0x001c`: zero-padded hex, which from_str_radix takes as is.
        v.strip_prefix("0x")
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or(QtestError::Refused { command, answer: v })
    }

    /// Writes one byte to an I/O port.
    pub async fn outb(&mut self, port: u16, value: u8) -> Result<(), QtestError> {
        self.command(&format!("outb 0x{port:x} 0x{value:x}"))
            .await
            .map(drop)
    }

    /// Turns on the controller's translation of the keyboard's set 2 to set 1, as
    /// firmware does for the guests that follow it (command byte 0x43: keyboard and
    /// mouse interrupts, translation): from then on a release is one byte, the code
    /// with its high bit set, instead of `f0` and the code.
    pub async fn translate_keyboard(&mut self) -> Result<(), QtestError> {
        self.outb(I8042_STATUS, 0x60).await?;
        self.outb(I8042_DATA, 0x43).await
    }

    /// Every byte waiting in the i8042 controller, in order, with whether it came from
    /// the auxiliary (mouse) port: a read of the data port hands over the next byte of
    /// the device's queue, until the status port says the output buffer is empty.
    pub async fn drain_i8042(&mut self) -> Result<Vec<(u8, bool)>, QtestError> {
        let mut out = Vec::new();
        loop {
            let status = self.inb(I8042_STATUS).await?;
            if status & 0x01 == 0 {
                return Ok(out);
            }
            if out.len() >= MAX_DRAIN {
                return Err(QtestError::Endless);
            }
            let b = self.inb(I8042_DATA).await?;
            out.push((b, status & 0x20 != 0));
        }
    }

    /// [`Qtest::drain_i8042`], keyboard bytes only (mouse bytes are an error: nothing
    /// enables the PS/2 mouse in a guest-less VM, so one means input went astray).
    pub async fn drain_keyboard(&mut self) -> Result<Vec<u8>, QtestError> {
        let all = self.drain_i8042().await?;
        if let Some(&(b, _)) = all.iter().find(|(_, aux)| *aux) {
            return Err(QtestError::Refused {
                command: "drain keyboard".into(),
                answer: format!("a mouse byte 0x{b:02x}"),
            });
        }
        Ok(all.into_iter().map(|(b, _)| b).collect())
    }
}

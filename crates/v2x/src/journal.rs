//! The MEC's durable state: an append-only journal of JSON lines, one record per change,
//! made durable (fdatasync) before the change is answered, so that a `kill -9` of the MEC
//! loses nothing it acknowledged.
//!
//! Why a journal and not a snapshot per change: a snapshot of every device's state written
//! on each authorization would cost O(devices) per request; a journal line costs the record.
//! Changes arriving while one sync runs share the next sync (group commit), so 1,000
//! vehicles authorizing at once pay a few syncs, not 1,000. The journal is rewritten from
//! the live state when it opens and whenever it has grown to several times that state.
//!
//! Order: the owner of the state sends a record while it still holds its state lock, so the
//! journal's order is the order of the changes; it waits for durability after the lock.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

/// Why the journal cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file cannot be opened, read, written or synced.
    #[error("MEC state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A complete line of the file is not a record.
    #[error("MEC state file {path}, line {line}: {reason} (restore it from a backup, or move it away to start empty)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The writer thread is gone (it failed earlier: see the log).
    #[error("the MEC state journal stopped after an earlier write error")]
    Stopped,
}

enum Msg<R> {
    Append(R, Option<oneshot::Sender<Result<(), String>>>),
    /// Replace the file by these records (the whole live state at the moment it was sent).
    Rewrite(Vec<R>),
}

/// A journal of records `R`; cheap to clone.
pub struct Journal<R> {
    tx: std::sync::mpsc::Sender<Msg<R>>,
    /// Records appended since the last rewrite.
    appended: Arc<AtomicU64>,
}

impl<R> Clone for Journal<R> {
    fn clone(&self) -> Self {
        Journal {
            tx: self.tx.clone(),
            appended: self.appended.clone(),
        }
    }
}

impl<R> std::fmt::Debug for Journal<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("appended", &self.appended.load(Ordering::Relaxed))
            .finish()
    }
}

/// Durability of one append: await it after releasing the state lock.
#[derive(Debug)]
pub struct Pending(Option<oneshot::Receiver<Result<(), String>>>);

impl Pending {
    /// Nothing to wait for (no journal).
    pub fn none() -> Pending {
        Pending(None)
    }

    /// Waits until the record is on disk.
    pub async fn durable(self) -> Result<(), JournalError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(JournalError::Io {
                    path: PathBuf::from("(journal)"),
                    source: std::io::Error::other(e),
                }),
                Err(_) => Err(JournalError::Stopped),
            },
        }
    }
}

/// Reads the records of `path` (none when it does not exist). A last line without its
/// newline is a write the crash cut short: it was never acknowledged, so it is dropped.
pub fn read<R: DeserializeOwned>(path: &Path) -> Result<Vec<R>, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_owned(),
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    parse(BufReader::new(f), path)
}

/// Parses journal text (exposed for the fuzz target).
pub fn parse<R: DeserializeOwned>(
    mut input: impl BufRead,
    path: &Path,
) -> Result<Vec<R>, JournalError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| JournalError::Io {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line += 1;
        if buf.last() != Some(&b'\n') {
            tracing::warn!(path = %path.display(), line, "dropping a torn last record");
            break;
        }
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.to_owned(),
            line,
            reason,
        };
        let text = std::str::from_utf8(&buf[..n - 1])
            .map_err(|_| corrupt("not UTF-8".into()))?
            .trim();
        if text.is_empty() {
            continue;
        }
        out.push(serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?);
    }
    Ok(out)
}

fn write_all_synced<R: Serialize>(path: &Path, records: &[R]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let mut text = Vec::new();
    for r in records {
        serde_json::to_writer(&mut text, r).map_err(std::io::Error::other)?;
        text.push(b'\n');
    }
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl<R: Serialize + Send + 'static> Journal<R> {
    /// Opens the journal at `path`, first rewriting it as exactly `live` (the state its old
    /// records were replayed into), so that it starts compact.
    pub fn open(path: &Path, live: &[R]) -> Result<Journal<R>, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        write_all_synced(path, live).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let (tx, rx) = std::sync::mpsc::channel::<Msg<R>>();
        let p = path.to_owned();
        std::thread::Builder::new()
            .name("mec-journal".into())
            .spawn(move || writer(p, file, rx))
            .map_err(io)?;
        Ok(Journal {
            tx,
            appended: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues `rec`; call while holding the lock of the state it changes.
    pub fn append(&self, rec: R) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.appended.fetch_add(1, Ordering::Relaxed);
        // A gone writer shows as a dropped sender: `durable` then says `Stopped`.
        let _ = self.tx.send(Msg::Append(rec, Some(tx)));
        Pending(Some(rx))
    }

    /// Whether the file has grown past `factor` times `live` records (and past a floor):
    /// time to `rewrite`.
    pub fn wants_rewrite(&self, live: usize) -> bool {
        let n = self.appended.load(Ordering::Relaxed);
        n > 4096 && n > 4 * live as u64
    }

    /// Replaces the file by `live`; call while holding the state lock (same order rule).
    pub fn rewrite(&self, live: Vec<R>) {
        self.appended.store(0, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Rewrite(live));
    }
}

/// The writer: takes every message queued, writes them, syncs once, answers them all.
fn writer<R: Serialize>(path: PathBuf, mut file: File, rx: std::sync::mpsc::Receiver<Msg<R>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        let mut waiting = Vec::new();
        let mut text = Vec::new();
        let mut result: Result<(), String> = Ok(());
        for m in batch {
            match m {
                Msg::Append(r, ack) => {
                    if let Err(e) = serde_json::to_writer(&mut text, &r) {
                        result = Err(e.to_string());
                    }
                    text.push(b'\n');
                    waiting.extend(ack);
                }
                Msg::Rewrite(live) => {
                    // What came before is in `live`: flush it first so answers stay honest.
                    if result.is_ok() && !text.is_empty() {
                        result = file
                            .write_all(&text)
                            .and_then(|()| file.sync_data())
                            .map_err(|e| e.to_string());
                    }
                    text.clear();
                    if result.is_ok() {
                        result = write_all_synced(&path, &live)
                            .and_then(|()| OpenOptions::new().append(true).open(&path))
                            .map(|f| file = f)
                            .map_err(|e| e.to_string());
                    }
                }
            }
        }
        if result.is_ok() && !text.is_empty() {
            result = file
                .write_all(&text)
                .and_then(|()| file.sync_data())
                .map_err(|e| e.to_string());
        }
        let failed = result.is_err();
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "MEC state journal write failed; refusing further changes");
        }
        for w in waiting {
            let _ = w.send(result.clone());
        }
        if failed {
            // A journal that failed once may hold a partial line: stop taking changes
            // rather than acknowledge ones a restart would not see.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    #[tokio::test]
    async fn appends_survive_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.jsonl");
        let j = Journal::open(&p, &[Rec { n: 0 }]).unwrap();
        let pend: Vec<Pending> = (1..=50).map(|n| j.append(Rec { n })).collect();
        for x in pend {
            x.durable().await.unwrap();
        }
        let back: Vec<Rec> = read(&p).unwrap();
        assert_eq!(back.len(), 51);
        assert_eq!(back[50], Rec { n: 50 });
        // A crash mid-write: half a record at the end.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"n\": 5")
            .unwrap();
        assert_eq!(read::<Rec>(&p).unwrap().len(), 51);
        // Rewrite keeps order with appends around it.
        j.append(Rec { n: 100 }).durable().await.unwrap();
        j.rewrite(vec![Rec { n: 7 }]);
        j.append(Rec { n: 8 }).durable().await.unwrap();
        assert_eq!(read::<Rec>(&p).unwrap(), vec![Rec { n: 7 }, Rec { n: 8 }]);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_named() {
        let text = b"{\"n\":1}\nnot json\n{\"n\":2}\n";
        let e = parse::<Rec>(&text[..], Path::new("/x/state.jsonl")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("line 2") && msg.contains("/x/state.jsonl"),
            "{msg}"
        );
    }
}

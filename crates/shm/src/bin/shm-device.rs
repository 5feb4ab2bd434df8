//! A device process for tests: attaches to the element at the socket given as
//! the first argument (`--netns` first moves it into a new network
//! namespace), prints `ready ID`, then answers one line per command:
//!
//! - `req E MS` — ask for entry E (MS milliseconds, 0: the element's limit):
//!   `granted V` | `held H` | `err …`
//! - `rel E` — release it: `released` | `notheld` | `noguard` | `err …`
//! - `store E OFF V` — a stray 8-byte store at byte OFF of E's slot:
//!   `stored` | `sigbus`
//! - `put E N` — write N as a checksummed payload through the guard: `put V`
//! - `spin E` — write checksummed payloads through the guard until killed
//! - `storm N SEED` — N stray stores to random words of entries this device
//!   holds no guard for: `storm stored=S sigbus=B`
//! - `read E` — `read V ok|bad`
//! - `exit`

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use shm::selfcheck::{payload, verify};
use shm::{Device, StoreOutcome, WriteGuard};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("fatal {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--netns") {
        shm::unshare_network()?;
        args.remove(0);
    }
    let socket = PathBuf::from(args.first().ok_or("usage: shm-device [--netns] SOCKET")?);
    let dev = Device::connect(&socket)?;
    let words = dev.layout().entry_size() as usize / 8;
    let slot = dev.layout().slot_size();
    let entries = dev.layout().entries();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {}", dev.id())?;
    out.flush()?;
    let mut guards: HashMap<u32, WriteGuard<'_>> = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, Box<dyn std::error::Error>> {
            Ok(f.get(i).ok_or("missing argument")?.parse::<u64>()?)
        };
        let reply = match f.first().copied() {
            Some("req") => {
                let e = num(1)? as u32;
                let ms = num(2)?;
                let t = (ms > 0).then(|| std::time::Duration::from_millis(ms));
                match dev.request_write(e, t) {
                    Ok(g) => {
                        let v = g.version();
                        // Asking again while holding extends the grant; keep
                        // one guard (dropping the old one would release).
                        if let Some(old) = guards.insert(e, g) {
                            std::mem::forget(old);
                        }
                        format!("granted {v}")
                    }
                    Err(shm::Error::Held { holder, .. }) => format!("held {holder}"),
                    Err(e) => format!("err {e}"),
                }
            }
            Some("rel") => match guards.remove(&(num(1)? as u32)) {
                None => "noguard".to_string(),
                Some(g) => match g.release() {
                    Ok(()) => "released".to_string(),
                    Err(shm::Error::NotHeld { .. }) => "notheld".to_string(),
                    Err(e) => format!("err {e}"),
                },
            },
            Some("store") => match dev.stray_store(num(1)? as u32, num(2)? as usize, num(3)?)? {
                StoreOutcome::Stored => "stored".to_string(),
                StoreOutcome::Sigbus => "sigbus".to_string(),
            },
            Some("put") => {
                let e = num(1)? as u32;
                let g = guards.get_mut(&e).ok_or("no guard")?;
                let v = g.write(&payload(num(2)?, words))?;
                format!("put {v}")
            }
            Some("spin") => {
                let e = num(1)? as u32;
                let g = guards.get_mut(&e).ok_or("no guard")?;
                writeln!(out, "spinning")?;
                out.flush()?;
                let mut n = 1u64;
                loop {
                    g.write(&payload(n, words))?;
                    n += 1;
                }
            }
            Some("storm") => {
                let n = num(1)?;
                let mut x = num(2)? | 1;
                let (mut stored, mut sigbus) = (0u64, 0u64);
                for _ in 0..n {
                    // xorshift64: cheap, reproducible from the seed.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let e = (x % u64::from(entries)) as u32;
                    if guards.contains_key(&e) {
                        continue;
                    }
                    let off = ((x >> 20) as usize % (slot / 8)) * 8;
                    match dev.stray_store(e, off, x)? {
                        StoreOutcome::Stored => stored += 1,
                        StoreOutcome::Sigbus => sigbus += 1,
                    }
                }
                format!("storm stored={stored} sigbus={sigbus}")
            }
            Some("read") => {
                let (v, b) = dev.read(num(1)? as u32)?;
                format!("read {v} {}", if verify(&b) { "ok" } else { "bad" })
            }
            Some("exit") => return Ok(()),
            _ => format!("err unknown command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

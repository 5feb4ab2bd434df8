//! Exports one file over NBD until killed.
//!
//! ```text
//! serve FILE [--listen 127.0.0.1:10809 | --unix PATH] [--name EXPORT] [--read-only] [--threads N]
//! ```
//! Prints `listening on ADDR` once bound (port 0 picks a free port). `--threads N`
//! sets `ServeConfig::threads_per_connection` (default 1: inline).

use std::sync::Arc;

use nbd::{FileDevice, NbdAddr, ServeConfig};

fn main() -> std::process::ExitCode {
    if let Err(e) = run() {
        eprintln!("serve: {e}");
        let mut src = std::error::Error::source(&*e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut listen = NbdAddr::Tcp("127.0.0.1:10809".parse()?);
    let mut name = String::new();
    let mut read_only = false;
    let mut threads = 1usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = NbdAddr::Tcp(args.next().ok_or("--listen needs an address")?.parse()?)
            }
            "--unix" => listen = NbdAddr::Unix(args.next().ok_or("--unix needs a path")?.into()),
            "--name" => name = args.next().ok_or("--name needs a value")?,
            "--read-only" => read_only = true,
            "--threads" => threads = args.next().ok_or("--threads needs a number")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: serve FILE [--listen ADDR | --unix PATH] [--name EXPORT] [--read-only]"
                );
                return Ok(());
            }
            _ if file.is_none() && !a.starts_with("--") => file = Some(a),
            _ => return Err(format!("unexpected argument {a:?}").into()),
        }
    }
    let file = file.ok_or("missing FILE")?;
    let dev = FileDevice::open(&file, read_only)?;
    let mut config = ServeConfig::new(listen).export(name, Arc::new(dev));
    config.threads_per_connection = threads;
    let handle = nbd::serve(config)?;
    println!("listening on {}", handle.local_addr());
    handle.wait();
    Ok(())
}

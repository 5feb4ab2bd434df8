//! Compiles the in-kernel classifier (`bpf/classifier.c`) to a BPF object with clang; the
//! crate embeds it (`kernel::CLASSIFIER_OBJECT`) and loads it with bpftool at run time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/classifier.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("classifier.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let status = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang -target bpf {src} failed ({s})"),
        Err(e) => panic!(
            "cannot run clang ({e}): the BPF classifier needs clang and libbpf-dev \
             (bash scripts/setup.sh installs them)"
        ),
    }
}

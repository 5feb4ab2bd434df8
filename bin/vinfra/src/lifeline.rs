//! `--exit-with-stdin`: a child of `vinfra up` exits when its parent goes away.
//!
//! The parent holds the write end of our stdin; when it exits for any reason (even
//! SIGKILL) the kernel closes it and our read returns EOF. This needs no unsafe
//! `prctl(PR_SET_PDEATHSIG)` and works across exec.

use tokio::io::AsyncReadExt;

/// Resolves when stdin reaches EOF or fails.
pub async fn parent_gone() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

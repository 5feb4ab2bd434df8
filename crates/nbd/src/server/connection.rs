//! Accepting connections: the acceptor loop, the connection registry, and one
//! connection's life (negotiation, then transmission).

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::negotiate;
use super::transmission::Transmission;
use super::Shared;
use crate::proto::*;
use crate::stream::Stream;

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub(super) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

pub(super) fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "nbd accept failed");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
            if *active >= shared.max_connections {
                tracing::warn!(
                    max = shared.max_connections,
                    "nbd connection limit reached; closing new connection"
                );
                continue;
            }
            *active += 1;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .stack_size(512 << 10)
            .spawn(move || run_connection(conn_shared, stream, id));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start nbd connection thread");
            drop(ConnGuard {
                shared: &shared,
                id,
            });
        }
    }
}

/// Unregisters a connection when its thread ends, even by panic.
pub(super) struct ConnGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = active.saturating_sub(1);
        self.shared.active_cv.notify_all();
    }
}

/// Why a connection ended early. Internal: logged, never returned to a caller.
#[derive(Debug)]
pub(super) enum ConnError {
    Io(io::Error),
    Proto(ProtoError),
    Policy(&'static str),
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<ProtoError> for ConnError {
    fn from(e: ProtoError) -> Self {
        ConnError::Proto(e)
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "i/o: {e}"),
            ConnError::Proto(e) => write!(f, "protocol: {e}"),
            ConnError::Policy(m) => f.write_str(m),
        }
    }
}

pub(super) fn run_connection(shared: Arc<Shared>, mut stream: Stream, id: u64) {
    let _guard = ConnGuard {
        shared: &shared,
        id,
    };
    let peer = stream.peer();
    stream.set_nodelay();
    let deadline = Instant::now() + shared.handshake_timeout;
    match negotiate(&shared, &mut stream, deadline) {
        Ok(Some(neg)) => {
            let c = &neg.export.counters;
            c.connections_total.fetch_add(1, Ordering::Relaxed);
            c.connections_active.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, name = %neg.name, structured = neg.structured, "nbd transmission started");
            let r = Transmission::new(&shared, &neg).run(&mut stream);
            c.connections_active.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => tracing::debug!(%peer, "nbd connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "nbd connection ended"),
            }
        }
        Ok(None) => tracing::debug!(%peer, "nbd client ended negotiation"),
        Err(e) => tracing::debug!(%peer, error = %e, "nbd negotiation failed"),
    }
    stream.shutdown();
}

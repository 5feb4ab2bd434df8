//! Sockets inside a network namespace.

pub use net::netns::in_netns;

/// A tokio UDP socket bound to `addr` inside `netns`.
pub fn udp(
    netns: Option<&str>,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::UdpSocket> {
    let s = in_netns(netns, move || std::net::UdpSocket::bind(addr))?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// A tokio TCP listener on `addr` inside `netns`.
pub fn tcp_listener(
    netns: Option<&str>,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let s = in_netns(netns, move || std::net::TcpListener::bind(addr))?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s)
}

/// A tokio TCP connection to `to` made inside `netns`.
pub async fn tcp_connect(
    netns: Option<&str>,
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let ns = netns.map(str::to_owned);
    let s = tokio::task::spawn_blocking(move || {
        in_netns(ns.as_deref(), move || {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))
        })
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    tokio::net::TcpStream::from_std(s)
}

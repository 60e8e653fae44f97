//! Loopback sockets handed over already bound, instead of free port numbers.
//!
//! A port number found by binding and dropping a socket can be taken by anyone before the
//! server under test binds it. Here every listener is bound first and given (with its address)
//! to whoever serves on it. Where a port must be written into a config file for a child
//! process that binds its own listeners, [`Reserved`] holds the port until the child is up.

use std::net::{Ipv4Addr, SocketAddr};

/// The loopback address with port 0: the kernel picks a free port at bind time.
pub const LOOPBACK_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// A tokio listener bound on 127.0.0.1 (a port of the kernel's choosing) and its address.
pub async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind(LOOPBACK_ANY)
        .await
        .expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("listener address");
    (l, addr)
}

/// A std listener bound on 127.0.0.1 and its address, for servers that take a std socket
/// (convert with `tokio::net::TcpListener::from_std` after `set_nonblocking(true)`).
pub fn std_listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind(LOOPBACK_ANY).expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("listener address");
    (l, addr)
}

/// Binds `addr` again (e.g. to restart a backend on the address it had), with `SO_REUSEADDR`
/// like every tokio listener, so connections of the previous one in TIME_WAIT do not block it.
pub async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("rebind {addr}: {e}"))
}

/// A loopback TCP port held for a process that binds it itself (a child given a config file).
///
/// The socket is bound with `SO_REUSEADDR` and never listens. Linux then lets another socket
/// that also sets `SO_REUSEADDR` (the gateway's listeners, Go's listeners in Pebble, every
/// tokio listener) bind and listen on the same port, while the kernel hands the port to no one
/// else: binds to port 0 and outgoing connections skip ports that are bound. Keep it until
/// the child listens (then the child's listener holds the port); connections to it meanwhile
/// are refused, as for a closed port.
///
/// Why not let the child report its ports: the gateway's config names its listeners, tests
/// rewrite that config for reloads, and the Pebble config must name its ports too. A reserved
/// port keeps those files exact and still cannot be taken by another test.
#[derive(Debug)]
pub struct Reserved {
    socket: socket2::Socket,
    addr: SocketAddr,
}

impl Reserved {
    /// Reserves a loopback port of the kernel's choosing.
    pub fn loopback() -> Reserved {
        Self::at(LOOPBACK_ANY)
    }

    /// Reserves `addr` (e.g. the address of a backend that is down and will come back).
    pub fn at(addr: SocketAddr) -> Reserved {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket
            .bind(&addr.into())
            .unwrap_or_else(|e| panic!("reserve {addr}: {e}"));
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("reserved address");
        Reserved { socket, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Turns the reservation into a listener on the same port (e.g. a backend coming up).
    pub fn listen(self) -> tokio::net::TcpListener {
        self.socket.listen(1024).expect("listen");
        self.socket.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpListener::from_std(self.socket.into()).expect("tokio listener")
    }
}

/// 127.0.0.{2+i}: a loopback address of its own for member `i` of a test fleet (Linux routes
/// all of 127/8 to loopback), so that a name can resolve to one member only.
pub fn member_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i as u8)
}

/// One port [`Reserved`] on each of the `n` member addresses ([`member_ip`]) at once, for
/// child processes that each bind it on their own address: an ACME server validates
/// HTTP-01 and TLS-ALPN-01 on one port at whatever address the name resolves to.
pub fn common_port(n: usize) -> (u16, Vec<Reserved>) {
    for _ in 0..50 {
        let first = Reserved::at(SocketAddr::new(member_ip(0).into(), 0));
        let port = first.port();
        let mut held = vec![first];
        for i in 1..n {
            match try_reserve(SocketAddr::new(member_ip(i).into(), port)) {
                Some(r) => held.push(r),
                None => break,
            }
        }
        if held.len() == n {
            return (port, held);
        }
    }
    panic!("no port free on {n} member addresses at once");
}

/// As [`common_port`], with the port listening on every member address (for servers in the
/// test process).
pub fn common_listeners(n: usize) -> (u16, Vec<tokio::net::TcpListener>) {
    let (port, held) = common_port(n);
    (port, held.into_iter().map(Reserved::listen).collect())
}

fn try_reserve(addr: SocketAddr) -> Option<Reserved> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).ok()?;
    // No SO_REUSEADDR here: a port someone else holds (even with it) must fail to bind.
    socket.bind(&addr.into()).ok()?;
    socket.set_reuse_address(true).ok()?;
    Some(Reserved { socket, addr })
}

/// An address where connections are refused (a bound socket that never listens): a dead
/// backend whose port nobody else can take while the value lives.
pub fn refusing() -> Reserved {
    Reserved::loopback()
}

/// A UDP socket on 127.0.0.1 that is never read: a name server that never answers, on a port
/// nobody else gets while the value lives.
pub fn silent_udp() -> (std::net::UdpSocket, SocketAddr) {
    let s = std::net::UdpSocket::bind(LOOPBACK_ANY).expect("bind udp 127.0.0.1:0");
    let addr = s.local_addr().expect("udp address");
    (s, addr)
}

/// A loopback address that accepts no connections and refuses none: a listener with a
/// backlog of one whose accept queue is full, so the kernel drops further SYNs and connects
/// hang (a black hole that stays on this machine). Connects time out while the value lives.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<tokio::net::TcpStream>,
}

impl BlackHole {
    pub async fn new() -> BlackHole {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(LOOPBACK_ANY).expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_millis(300), connect).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filling the backlog of {addr}: {e}"),
                Err(_) => {
                    return BlackHole {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
            }
        }
        panic!("{addr} still accepts connections after filling its backlog");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reserved_port_refuses_until_a_reuseaddr_listener_takes_it() {
        let r = Reserved::loopback();
        assert!(tokio::net::TcpStream::connect(r.addr()).await.is_err());
        // Another port-0 bind never gets it.
        for _ in 0..50 {
            assert_ne!(listener().await.1.port(), r.port());
        }
        // A listener with SO_REUSEADDR (as the gateway's and tokio's) binds it while held.
        let l = rebind(r.addr()).await;
        let (accepted, connected) =
            tokio::join!(l.accept(), tokio::net::TcpStream::connect(r.addr()));
        accepted.expect("accept");
        connected.expect("connect");
    }

    #[tokio::test]
    async fn a_common_port_listens_on_every_member_address() {
        let (port, listeners) = common_listeners(3);
        for (i, l) in listeners.iter().enumerate() {
            let addr = SocketAddr::new(member_ip(i).into(), port);
            assert_eq!(l.local_addr().unwrap(), addr);
            let (accepted, connected) =
                tokio::join!(l.accept(), tokio::net::TcpStream::connect(addr));
            accepted.expect("accept");
            connected.expect("connect");
        }
    }

    #[tokio::test]
    async fn a_reservation_turns_into_a_listener() {
        let r = Reserved::loopback();
        let addr = r.addr();
        let l = r.listen();
        let (accepted, connected) = tokio::join!(l.accept(), tokio::net::TcpStream::connect(addr));
        accepted.expect("accept");
        connected.expect("connect");
    }
}

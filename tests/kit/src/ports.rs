//! Free loopback ports.

use std::net::{SocketAddr, TcpListener};

/// A free loopback port below 55535, whose Redis cluster bus port (+10000) is free too.
/// Another program may take it before it is used: a small race every harness accepts.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding 127.0.0.1:0")
            .port();
        if port < 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A loopback address on a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

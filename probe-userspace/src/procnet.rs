//! TCP sockets a process already has open, from /proc: its fds name socket inodes
//! (`socket:[INODE]`), and /proc/PID/net/tcp{,6} give each inode's addresses and state.
//! (The kernel hashes socket pointers in /proc, so the inode is the only join key.)
//! This is how connections opened before the attach — warm keep-alive pools — are known.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// How brokerprobe treats a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Accepted: clients send requests in, the broker answers.
    Inbound,
    /// Connected by the broker: it sends requests out (to providers).
    Upstream,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Inbound => "inbound",
            Role::Upstream => "upstream",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenSocket {
    pub fd: i32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// One row of /proc/net/tcp{,6}.
#[derive(Clone, Copy, Debug, PartialEq)]
struct TcpRow {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// The process's established TCP sockets, each with its role: a socket whose local port
/// is one the process listens on was accepted; any other was connected by the process.
pub fn established_sockets(pid: u32) -> io::Result<Vec<OpenSocket>> {
    let inodes = socket_inodes(pid)?;
    let rows = tcp_rows(pid)?;
    let owned = |row: &&TcpRow| inodes.contains_key(&row.inode);
    let listening: HashSet<u16> = rows
        .iter()
        .filter(owned)
        .filter(|row| row.state == TCP_LISTEN)
        .map(|row| row.local.port())
        .collect();
    Ok(rows
        .iter()
        .filter(owned)
        .filter(|row| row.state == TCP_ESTABLISHED)
        .map(|row| OpenSocket {
            fd: inodes[&row.inode],
            local: row.local,
            remote: row.remote,
            role: if listening.contains(&row.local.port()) {
                Role::Inbound
            } else {
                Role::Upstream
            },
        })
        .collect())
}

/// Socket inode → fd, for every socket fd of the process.
fn socket_inodes(pid: u32) -> io::Result<HashMap<u64, i32>> {
    let mut inodes = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // An fd closed since the listing is simply not there any more.
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok());
        if let Some(inode) = inode {
            inodes.insert(inode, fd);
        }
    }
    Ok(inodes)
}

/// Rows of the process's network namespace's TCP tables (all processes in it).
fn tcp_rows(pid: u32) -> io::Result<Vec<TcpRow>> {
    let mut rows = Vec::new();
    for table in ["tcp", "tcp6"] {
        match fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => rows.extend(text.lines().skip(1).filter_map(parse_row)),
            // No IPv6 in this kernel or namespace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(rows)
}

/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`
fn parse_row(line: &str) -> Option<TcpRow> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(TcpRow {
        local: parse_endpoint(fields.get(1)?)?,
        remote: parse_endpoint(fields.get(2)?)?,
        state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): the address is printed as
/// 32-bit words in host byte order, the port in hex.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
        .map(|i| {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_canonical(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_rows() {
        let v4 = "   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let row = parse_row(v4).unwrap();
        assert_eq!(row.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(row.remote, "127.0.0.1:50000".parse().unwrap());
        assert_eq!((row.state, row.inode), (TCP_ESTABLISHED, 123456));

        // ::ffff:10.0.0.2 as the kernel prints it on little-endian machines.
        let v6 = "   0: 0000000000000000FFFF00000200000A:01BB 00000000000000000000000001000000:0050 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        let row = parse_row(v6).unwrap();
        assert_eq!(row.local, "10.0.0.2:443".parse().unwrap());
        assert_eq!(row.remote, "[::1]:80".parse().unwrap());
        assert_eq!(row.state, TCP_LISTEN);
        assert_eq!(parse_row("  sl  local_address rem_address   st"), None);
    }

    /// A real listener and a real connection of this very process.
    #[test]
    fn finds_own_sockets_with_roles() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let sockets = established_sockets(std::process::id()).unwrap();
        let find = |local: SocketAddr| sockets.iter().find(|s| s.local == local).copied();
        let outbound = find(client.local_addr().unwrap()).expect("client socket");
        assert_eq!(outbound.role, Role::Upstream);
        assert_eq!(outbound.remote, listener.local_addr().unwrap());
        // The accepted socket is the only established one on the listening port.
        let inbound = find(server.local_addr().unwrap()).expect("accepted socket");
        assert_eq!(inbound.role, Role::Inbound);
        assert_eq!(inbound.remote, client.local_addr().unwrap());
        use std::os::fd::AsRawFd as _;
        assert_eq!(inbound.fd, server.as_raw_fd());
        assert_eq!(outbound.fd, client.as_raw_fd());
    }
}

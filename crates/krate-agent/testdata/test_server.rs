//! krate's test server, packed into the `test-server` test image (built static, std
//! only, by the test fixture). HTTP on $PORT (default 8080):
//!   GET /                  "<hostname> <path>" (an echo)
//!   GET /healthz, /readyz  200 "ok", or 500 once failed
//!   GET /fail/healthz, /fail/readyz, /ok/healthz, /ok/readyz   toggles them
//!   GET /exit/<code>       exits with <code>
//!   GET /alloc/<MiB>       allocates and touches <MiB> of memory, and keeps it
//!   GET /env/<NAME>        the value of an environment variable
//!   GET /file/<path>       the content of a file (404 if it cannot be read)
//!   GET /client            "<hostname> <client address>" (who connected, as seen here)
//!   GET /stream/<seconds>  a line a tenth of a second, for that long
//!   GET /time              this node's clock: milliseconds since the epoch
//!   GET /fetch/<host>:<port>/<path>   GETs http://<host>:<port>/<path> from this pod and
//!                          answers with its body (502 and the error when it fails); a
//!                          name is resolved with an A query to resolv.conf's first
//!                          nameserver (the program is static: no NSS)
//! With EXIT_AFTER_SECONDS set, exits with EXIT_CODE (default 0) after that long.
//! `test-server sleep <seconds>` just sleeps. SIGTERM exits at once (code 0).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static HEALTHY: AtomicBool = AtomicBool::new(true);
static READY: AtomicBool = AtomicBool::new(true);
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn reply(stream: &mut TcpStream, code: u16, body: &str, keep: bool) {
    let reason = if code == 200 { "OK" } else { "Error" };
    let connection = if keep { "keep-alive" } else { "close" };
    // One write: a reply in pieces would wait on the client's delayed ACKs.
    let text = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}", body.len());
    let _ = stream.write_all(text.as_bytes());
}

/// Serves requests on one connection: HTTP/1.1 ones keep it open unless they ask to
/// close it; HTTP/1.0 ones close it.
fn handle(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map(|n| n == 0).unwrap_or(true) {
            return;
        }
        // Read the whole request head: closing with unread bytes would reset the
        // connection before the client reads the reply.
        let mut keep = line.trim_end().ends_with("HTTP/1.1");
        let mut header = String::new();
        while reader.read_line(&mut header).map(|n| n > 0).unwrap_or(false) && header != "\r\n" {
            if header.to_ascii_lowercase().starts_with("connection:") && header.to_ascii_lowercase().contains("close") {
                keep = false;
            }
            header.clear();
        }
        if !answer(&mut stream, &line, keep) || !keep {
            return;
        }
    }
}

/// Answers one request; false when the connection is done with.
fn answer(stream: &mut TcpStream, line: &str, keep: bool) -> bool {
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let status = |flag: &AtomicBool| if flag.load(Ordering::SeqCst) { (200, "ok".to_string()) } else { (500, "failing".to_string()) };
    let (code, body) = match path.as_str() {
        "/healthz" => status(&HEALTHY),
        "/readyz" => status(&READY),
        "/fail/healthz" => (200, format!("{}", HEALTHY.swap(false, Ordering::SeqCst))),
        "/ok/healthz" => (200, format!("{}", HEALTHY.swap(true, Ordering::SeqCst))),
        "/fail/readyz" => (200, format!("{}", READY.swap(false, Ordering::SeqCst))),
        "/ok/readyz" => (200, format!("{}", READY.swap(true, Ordering::SeqCst))),
        p if p.starts_with("/exit/") => {
            reply(stream, 200, "bye", false);
            let _ = stream.flush();
            std::process::exit(p[6..].parse().unwrap_or(1));
        }
        p if p.starts_with("/alloc/") => {
            let mib: usize = p[7..].parse().unwrap_or(0);
            let mut block = vec![0u8; mib << 20];
            for i in (0..block.len()).step_by(4096) {
                block[i] = 1;
            }
            HELD.lock().unwrap().push(block);
            (200, format!("holding {mib} MiB more"))
        }
        p if p.starts_with("/env/") => (200, std::env::var(&p[5..]).unwrap_or_default()),
        "/client" => (200, format!("{hostname} {peer}")),
        p if p.starts_with("/stream/") => {
            let ticks = p[8..].parse::<u64>().unwrap_or(1) * 10;
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n");
            for i in 0..ticks {
                if writeln!(stream, "{hostname} {i}").is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return false;
        }
        "/time" => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (200, now.as_millis().to_string())
        }
        p if p.starts_with("/fetch/") => match fetch(&p[7..]) {
            Ok(body) => (200, body),
            Err(e) => (502, e),
        },
        p if p.starts_with("/file/") => match std::fs::read_to_string(&p[5..]) {
            Ok(text) => (200, text),
            Err(e) => (404, e.to_string()),
        },
        p => (200, format!("{hostname} {p}")),
    };
    reply(stream, code, &body, keep);
    true
}

/// The IPv4 address of `name` from the first nameserver of /etc/resolv.conf.
fn resolve(name: &str) -> Result<Ipv4Addr, String> {
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
    let server = conf
        .lines()
        .find_map(|l| l.strip_prefix("nameserver"))
        .map(str::trim)
        .ok_or("no nameserver in /etc/resolv.conf")?;
    let mut query = vec![0x4b, 0x52, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    socket.send_to(&query, (server, 53)).map_err(|e| format!("asking {server}: {e}"))?;
    let mut answer = [0u8; 1500];
    let n = socket.recv(&mut answer).map_err(|e| format!("no answer from {server} for {name}: {e}"))?;
    let answer = &answer[..n];
    if n < 12 || answer[3] & 0x0f != 0 {
        return Err(format!("{server} answered {name} with rcode {}", answer.get(3).map_or(0, |b| b & 0x0f)));
    }
    // Skip the question, then take the first A record.
    let mut at = 12;
    while at < n && answer[at] != 0 {
        at += answer[at] as usize + 1;
    }
    at += 5;
    for _ in 0..u16::from_be_bytes([answer[6], answer[7]]) {
        if at + 12 > n {
            break;
        }
        at += if answer[at] & 0xc0 == 0xc0 { 2 } else { answer[at..].iter().position(|b| *b == 0).unwrap_or(0) + 1 };
        let kind = u16::from_be_bytes([answer[at], answer[at + 1]]);
        let length = u16::from_be_bytes([answer[at + 8], answer[at + 9]]) as usize;
        at += 10;
        if kind == 1 && length == 4 && at + 4 <= n {
            return Ok(Ipv4Addr::new(answer[at], answer[at + 1], answer[at + 2], answer[at + 3]));
        }
        at += length;
    }
    Err(format!("{server} has no A record for {name}"))
}

/// GETs `target` (`host:port/path`) and returns the body.
fn fetch(target: &str) -> Result<String, String> {
    let (authority, path) = target.split_once('/').unwrap_or((target, ""));
    let (host, port) = authority.rsplit_once(':').ok_or("fetch needs host:port")?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let ip = resolve(host)?;
    let mut stream = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(3))
        .map_err(|e| format!("connecting to {ip}:{port}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("reading from {ip}:{port}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{ip}:{port} answered {}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_string())
}

extern "C" {
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
}

extern "C" fn on_term(_: i32) {
    std::process::exit(0);
}

fn main() {
    // As PID 1 the process would ignore SIGTERM without a handler.
    unsafe { signal(15, on_term) };
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("sleep") {
        let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX / 2);
        std::thread::sleep(Duration::from_secs(seconds));
        return;
    }
    if let Some(after) = std::env::var("EXIT_AFTER_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()) {
        let code: i32 = std::env::var("EXIT_CODE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(after));
            std::process::exit(code);
        });
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("listen");
    println!("test-server listening on :{port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || handle(stream));
    }
}

//! The cluster DNS responder of a node (as NodeLocal DNSCache, but without an extra pod:
//! the node agent runs it, and the proxy sends the `kube-dns` Service's address to it).
//! It answers the cluster zone from the node's [`Catalog`] (`records.rs`), forwards every
//! other name to the node's own resolvers with a cache, over UDP and TCP. A malformed
//! packet gets FORMERR (or nothing, when not even its header is there); nothing a client
//! sends stops it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::catalog::Catalog;

pub mod metrics;
pub mod records;

use records::{Entry, Index, Lookup};

/// The schema version `dns-version.<zone>` announces.
pub const SCHEMA_VERSION: &str = "1.1.0";
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CACHE_TTL: u32 = 300;
const NEGATIVE_TTL: u32 = 30;
const CACHE_ENTRIES: usize = 10_000;
/// The UDP payload the responder offers with EDNS.
const EDNS_PAYLOAD: u16 = 1232;

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain, `cluster.local`.
    pub zone: String,
    pub listen: SocketAddr,
    /// Where names outside the zone go (the node's resolv.conf).
    pub upstreams: Vec<SocketAddr>,
    /// TTL of the zone's records (upstream CoreDNS: 5 s).
    pub ttl: u32,
}

/// A resolv.conf's `nameserver`s as upstreams (port 53), leaving out `skip` (the cluster
/// DNS itself and this responder, should the node point at them).
pub fn upstreams(servers: &[String], skip: &[IpAddr]) -> Vec<SocketAddr> {
    servers
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .filter(|ip| !skip.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

struct Cached {
    response: Message,
    stored: Instant,
    ttl: u32,
}

pub struct Responder {
    config: DnsConfig,
    /// `cluster.local.`
    zone: String,
    index: RwLock<Index>,
    cache: Mutex<HashMap<(String, RecordType), Cached>>,
    /// The zone's encoded answers, by the request's bytes after its ID (flags, counts,
    /// question, EDNS): a repeated question costs a copy and two bytes of ID. Valid for
    /// one generation of the index.
    answers: RwLock<AnswerCache>,
    generation: std::sync::atomic::AtomicU64,
}

/// What [`Responder::local`] made of a message.
pub enum Handled {
    Done(Option<Vec<u8>>),
    Forward(Box<Pending>),
}

/// A question waiting for the upstream resolvers.
pub struct Pending {
    request: Message,
    response: Message,
    /// What to ask upstream.
    query: Query,
    transport: Transport,
    started: Instant,
    /// The zone answered a CNAME whose target is outside it.
    chase: bool,
}

/// The rcode labels of the codes a 4-bit header field carries.
fn rcode_static(code: u8) -> &'static str {
    match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

/// An encoded zone answer.
struct CachedAnswer {
    generation: u64,
    transport: Transport,
    bytes: Vec<u8>,
    type_label: &'static str,
    rcode: &'static str,
    zone: String,
}

impl CachedAnswer {
    /// The answer to `packet`: its ID, and the metrics a fresh answer would record.
    fn finish(&self, packet: &[u8], transport: Transport, started: Instant) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        bytes[..2].copy_from_slice(&packet[..2]);
        metrics::observe(transport, self.type_label, &self.zone, self.rcode, started.elapsed());
        bytes
    }
}

/// Encoded zone answers, bounded.
#[derive(Default)]
struct AnswerCache(HashMap<Vec<u8>, CachedAnswer>);

const ANSWER_ENTRIES: usize = 50_000;

impl AnswerCache {
    fn get(&self, packet: &[u8], generation: u64, transport: Transport) -> Option<&CachedAnswer> {
        let hit = self.0.get(packet.get(2..)?)?;
        (hit.generation == generation && hit.transport == transport).then_some(hit)
    }

    fn insert(&mut self, key: Vec<u8>, answer: CachedAnswer) {
        if self.0.len() >= ANSWER_ENTRIES {
            let generation = answer.generation;
            self.0.retain(|_, a| a.generation == generation);
            if self.0.len() >= ANSWER_ENTRIES {
                self.0.clear();
            }
        }
        self.0.insert(key, answer);
    }
}

/// How a request arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Responder {
    pub fn new(config: DnsConfig) -> Arc<Self> {
        let zone = format!("{}.", config.zone.trim_end_matches('.')).to_lowercase();
        Arc::new(Self {
            config,
            zone,
            index: RwLock::default(),
            cache: Mutex::default(),
            answers: RwLock::default(),
            generation: Default::default(),
        })
    }

    /// Applies what changed in the catalog.
    pub fn follow(&self, changes: &crate::catalog::Changes) {
        changes.take(|dirty, known| {
            let mut index = self.index.write().expect("dns index lock");
            for key in dirty {
                index.update(&key, known.services.get(&key), &known.slices_of(&key), &self.zone);
            }
            self.generation.store(index.generation, std::sync::atomic::Ordering::Release);
        });
    }

    fn name(s: &str) -> Option<Name> {
        Name::from_ascii(s).ok()
    }

    fn soa(&self) -> Record {
        let zone = Self::name(&self.zone).unwrap_or_else(Name::root);
        let mname = Self::name(&format!("ns.dns.{}", self.zone)).unwrap_or_else(Name::root);
        let rname = Self::name(&format!("hostmaster.{}", self.zone)).unwrap_or_else(Name::root);
        let serial = self.index.read().expect("dns index lock").generation as u32;
        let soa = SOA::new(mname, rname, serial, 7200, 1800, 86400, self.config.ttl);
        Record::from_rdata(zone, self.config.ttl.min(300), RData::SOA(soa))
    }

    /// The zone's records of `qtype` for `name`, following a CNAME inside the zone.
    fn records(&self, name: &Name, qtype: RecordType, entry: &Entry, out: &mut Message) {
        let ttl = self.config.ttl;
        let owner = name.clone();
        let apex = name.to_lowercase().to_ascii() == self.zone;
        let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        if let Some(target) = entry.cname.as_deref().and_then(Self::name) {
            out.answers.push(Record::from_rdata(owner, ttl, RData::CNAME(CNAME(target))));
            return;
        }
        for ip in &entry.addresses {
            match ip {
                IpAddr::V4(v4) if wants(RecordType::A) => {
                    out.answers.push(Record::from_rdata(owner.clone(), ttl, RData::A(A(*v4))))
                }
                IpAddr::V6(v6) if wants(RecordType::AAAA) => {
                    out.answers.push(Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*v6))))
                }
                _ => {}
            }
        }
        if wants(RecordType::SRV) && !entry.srv.is_empty() {
            let weight = (100 / entry.srv.len() as u16).max(1);
            let index = self.index.read().expect("dns index lock");
            for (port, target) in &entry.srv {
                let Some(target_name) = Self::name(target) else { continue };
                out.answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::SRV(SRV::new(0, weight, *port, target_name.clone())),
                ));
                if let Lookup::Found(t) = index.lookup(target, &self.zone) {
                    for ip in &t.addresses {
                        let data = match ip {
                            IpAddr::V4(v4) => RData::A(A(*v4)),
                            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                        };
                        out.additionals.push(Record::from_rdata(target_name.clone(), ttl, data));
                    }
                }
            }
        }
        if wants(RecordType::PTR) {
            for target in entry.ptr.iter().filter_map(|t| Self::name(t)) {
                out.answers.push(Record::from_rdata(owner.clone(), ttl, RData::PTR(PTR(target))));
            }
        }
        if wants(RecordType::TXT) && name.to_lowercase().to_ascii() == format!("dns-version.{}", self.zone) {
            out.answers.push(Record::from_rdata(
                owner.clone(),
                28800,
                RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
            ));
        }
        if apex && wants(RecordType::SOA) {
            out.answers.push(self.soa());
        }
    }

    /// The answer to one DNS message (None: not even a header to answer to).
    pub async fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.local(packet, transport) {
            Handled::Done(reply) => reply,
            Handled::Forward(pending) => self.complete(pending).await,
        }
    }

    /// Answers what the zone can at once; a name for the upstream resolvers comes back
    /// as [`Handled::Forward`], for [`Self::complete`].
    pub fn local(&self, packet: &[u8], transport: Transport) -> Handled {
        let started = Instant::now();
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if let Some(reply) = self.answers.read().expect("dns answers lock").get(packet, generation, transport) {
            return Handled::Done(Some(reply.finish(packet, transport, started)));
        }
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) if packet.len() >= 12 => {
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                metrics::observe(transport, "other", ".", "FORMERR", started.elapsed());
                return Handled::Done(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok());
            }
            Err(_) => return Handled::Done(None),
        };
        if request.metadata.message_type != MessageType::Query {
            return Handled::Done(None);
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.queries.clone_from(&request.queries);
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.edns = Some(edns);
        }
        let query = match (request.metadata.op_code, request.queries.as_slice()) {
            (OpCode::Query, [q]) => q.clone(),
            (op, _) => {
                let code = if op == OpCode::Query { ResponseCode::FormErr } else { ResponseCode::NotImp };
                response.metadata.response_code = code;
                return Handled::Done(self.finish(response, &request, transport, "other", ".", started));
            }
        };
        let qname = query.name.to_lowercase().to_ascii();
        let qname = if qname.ends_with('.') { qname } else { format!("{qname}.") };
        let qtype = query.query_type;
        let lookup = self.index.read().expect("dns index lock").lookup(&qname, &self.zone);
        let type_label = metrics::type_label(qtype);
        let zone = self.zone.clone();
        match lookup {
            Lookup::Found(entry) => {
                response.metadata.authoritative = true;
                self.records(&query.name, qtype, &entry, &mut response);
                // A CNAME out of the zone: the target's records come from upstream.
                let target = entry.cname.as_deref().filter(|_| qtype != RecordType::CNAME).and_then(Self::name);
                if let Some(target) = target.filter(|t| !t.to_lowercase().to_ascii().ends_with(&self.zone)) {
                    let query = Query::query(target, qtype);
                    return Handled::Forward(Box::new(Pending {
                        request,
                        response,
                        query,
                        transport,
                        started,
                        chase: true,
                    }));
                }
                if response.answers.is_empty() {
                    response.authorities.push(self.soa());
                }
                let reply = self.finish(response, &request, transport, type_label, &zone, started);
                Handled::Done(self.remember(packet, generation, transport, type_label, reply))
            }
            Lookup::NxDomain => {
                response.metadata.authoritative = true;
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(self.soa());
                let reply = self.finish(response, &request, transport, type_label, &zone, started);
                Handled::Done(self.remember(packet, generation, transport, type_label, reply))
            }
            Lookup::Forward => {
                Handled::Forward(Box::new(Pending { request, response, query, transport, started, chase: false }))
            }
        }
    }

    /// Keeps a zone answer for the next time the same question comes.
    fn remember(
        &self,
        packet: &[u8],
        generation: u64,
        transport: Transport,
        type_label: &'static str,
        reply: Option<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        let bytes = reply?;
        if bytes.len() >= 12 && packet.len() >= 12 {
            let rcode = rcode_static(bytes[3] & 0x0f);
            let answer = CachedAnswer {
                generation,
                transport,
                bytes: bytes.clone(),
                type_label,
                rcode,
                zone: self.zone.clone(),
            };
            self.answers.write().expect("dns answers lock").insert(packet[2..].to_vec(), answer);
        }
        Some(bytes)
    }

    /// Finishes a question the upstream resolvers answer.
    pub async fn complete(&self, pending: Box<Pending>) -> Option<Vec<u8>> {
        let Pending { request, mut response, query, transport, started, chase } = *pending;
        let type_label = metrics::type_label(request.queries[0].query_type);
        let upstream = self.forward(&query).await;
        if chase {
            // The CNAME is the zone's; the target's records follow it.
            if let Some(upstream) = upstream {
                response.answers.extend(upstream.answers);
            }
            let zone = self.zone.clone();
            return self.finish(response, &request, transport, type_label, &zone, started);
        }
        match upstream {
            Some(upstream) => {
                response.metadata.response_code = upstream.metadata.response_code;
                response.answers = upstream.answers;
                response.authorities = upstream.authorities;
                response.additionals = upstream.additionals;
            }
            None => response.metadata.response_code = ResponseCode::ServFail,
        }
        self.finish(response, &request, transport, type_label, ".", started)
    }

    fn finish(
        &self,
        mut response: Message,
        request: &Message,
        transport: Transport,
        type_label: &'static str,
        zone: &str,
        started: Instant,
    ) -> Option<Vec<u8>> {
        let mut bytes = response.to_vec().ok()?;
        if transport == Transport::Udp && bytes.len() > usize::from(request.max_payload()) {
            response.answers.clear();
            response.authorities.clear();
            response.additionals.clear();
            response.metadata.truncation = true;
            bytes = response.to_vec().ok()?;
        }
        let rcode = rcode_static((u16::from(response.metadata.response_code) & 0x0f) as u8);
        metrics::observe(transport, type_label, zone, rcode, started.elapsed());
        Some(bytes)
    }

    /// A name outside the zone, from the cache or the upstream resolvers.
    async fn forward(&self, query: &Query) -> Option<Message> {
        let key = (query.name.to_lowercase().to_ascii(), query.query_type);
        if let Some(hit) = self.cached(&key) {
            return Some(hit);
        }
        let mut ask = Message::query();
        ask.metadata.recursion_desired = true;
        ask.queries.push(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        ask.edns = Some(edns);
        let bytes = ask.to_vec().ok()?;
        for upstream in &self.config.upstreams {
            match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange(*upstream, &bytes, ask.metadata.id)).await {
                Ok(Ok(answer)) if answer.metadata.response_code != ResponseCode::ServFail => {
                    self.store(key, &answer);
                    return Some(answer);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream resolver failed"),
                Err(_) => tracing::debug!(%upstream, "upstream resolver timed out"),
            }
        }
        None
    }

    fn cached(&self, key: &(String, RecordType)) -> Option<Message> {
        let cache = self.cache.lock().expect("dns cache lock");
        let hit = cache.get(key)?;
        let age = hit.stored.elapsed().as_secs() as u32;
        if age >= hit.ttl {
            return None;
        }
        let mut response = hit.response.clone();
        for record in response.answers.iter_mut().chain(response.authorities.iter_mut()) {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(response)
    }

    fn store(&self, key: (String, RecordType), answer: &Message) {
        let ttl = if answer.answers.is_empty() {
            answer.authorities.iter().map(|r| r.ttl).min().unwrap_or(NEGATIVE_TTL).min(NEGATIVE_TTL)
        } else {
            answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        }
        .min(MAX_CACHE_TTL);
        if ttl == 0 {
            return;
        }
        let mut cache = self.cache.lock().expect("dns cache lock");
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, c| c.stored.elapsed().as_secs() < u64::from(c.ttl));
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, Cached { response: answer.clone(), stored: Instant::now(), ttl });
    }
}

/// One question to an upstream resolver over UDP (TCP again if the answer is cut).
async fn exchange(upstream: SocketAddr, query: &[u8], id: u16) -> Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        let Ok(answer) = Message::from_vec(&buf[..n]) else { continue };
        if answer.metadata.id != id {
            continue;
        }
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        break;
    }
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    stream.write_all(&(query.len() as u16).to_be_bytes()).await?;
    stream.write_all(query).await?;
    let len = stream.read_u16().await? as usize;
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await?;
    Ok(Message::from_vec(&answer)?)
}

/// Serves `config.listen` over UDP and TCP from what `catalog` shows, until dropped.
pub async fn run(catalog: &Catalog, config: DnsConfig) -> Result<()> {
    let listen = config.listen;
    let sockets =
        udp_sockets(listen, UDP_THREADS).with_context(|| format!("cluster DNS: listening on udp {listen}"))?;
    let tcp = TcpListener::bind(listen).await.with_context(|| format!("cluster DNS: listening on tcp {listen}"))?;
    let responder = Responder::new(config);
    metrics::set_server(&format!("dns://{listen}"));
    tracing::info!(%listen, upstreams = ?responder.config.upstreams, "cluster DNS serving");
    let stop = Stop::default();
    for (n, socket) in sockets.into_iter().enumerate() {
        let (responder, stop, handle) = (responder.clone(), stop.0.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name(format!("krate-dns-udp-{n}"))
            .spawn(move || serve_udp(socket, &responder, &stop, &handle))
            .context("cluster DNS: starting a UDP thread")?;
    }
    let changes = catalog.listen();
    let follow = async {
        loop {
            changes.changed().await;
            responder.follow(&changes);
        }
    };
    tokio::select! {
        () = follow => Ok(()),
        r = serve_tcp(tcp, responder.clone()) => r,
    }
}

/// Threads answering UDP: zone answers are a lookup and an encode, so blocking sockets
/// on threads of their own (one socket each, the kernel spreading datagrams by
/// `SO_REUSEPORT`) answer more per core than tasks woken by the async runtime.
const UDP_THREADS: usize = 2;

/// Tells the UDP threads to finish when `run` is dropped.
#[derive(Default)]
struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// `count` UDP sockets on `listen` sharing it by `SO_REUSEPORT` (a port 0 is chosen once).
fn udp_sockets(listen: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = listen;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let socket: std::net::UdpSocket = socket.into();
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

fn serve_udp(
    socket: std::net::UdpSocket,
    responder: &Arc<Responder>,
    stop: &std::sync::atomic::AtomicBool,
    runtime: &tokio::runtime::Handle,
) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "dns: receive failed");
                continue;
            }
        };
        // Answers from the zone go at once; forwarded ones must not hold up the rest.
        match responder.local(&buf[..n], Transport::Udp) {
            Handled::Done(Some(reply)) => {
                let _ = socket.send_to(&reply, peer);
            }
            Handled::Done(None) => {}
            Handled::Forward(pending) => {
                let (socket, responder) = (socket.clone(), responder.clone());
                runtime.spawn(async move {
                    if let Some(reply) = responder.complete(pending).await {
                        // A datagram send does not wait on the peer.
                        let _ = socket.send_to(&reply, peer);
                    }
                });
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, responder: Arc<Responder>) -> Result<()> {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "dns: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            loop {
                let read = tokio::time::timeout(Duration::from_secs(10), stream.read_u16()).await;
                let Ok(Ok(len)) = read else { return };
                let mut packet = vec![0u8; usize::from(len)];
                if stream.read_exact(&mut packet).await.is_err() {
                    return;
                }
                let Some(reply) = responder.handle(&packet, Transport::Tcp).await else { return };
                let len = (reply.len() as u16).to_be_bytes();
                if stream.write_all(&len).await.is_err() || stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;

//! A SPDY/3.1 client session: as much of the protocol as the CRI streaming server
//! (containerd's copy of the kubelet's `remotecommand` server) needs to run an exec or
//! attach with separate, half-closable stdin/stdout/stderr/error/resize streams.
//!
//! Kubernetes' SPDY peers (moby/spdystream) do no flow control, so neither does this:
//! WINDOW_UPDATE and SETTINGS are read and ignored. Header blocks are zlib streams with
//! the SPDY/3 preset dictionary, one compression context per direction for the whole
//! connection, so every header-bearing frame is decompressed even when ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status for streams this client refuses (the server opening its own).
const REFUSED_STREAM: u32 = 3;
/// Largest frame payload accepted (SPDY allows 16 MiB; kubelet peers send ≤ 32 KiB).
const MAX_FRAME: usize = 1 << 24;

/// The SPDY/3 header-compression dictionary: the spec's length-prefixed header names
/// and common values, then a run of status codes, dates and media types.
pub fn dictionary() -> &'static [u8] {
    static DICTIONARY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICTIONARY.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
            "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
            "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
            "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut dict = Vec::with_capacity(1423);
        for word in WORDS {
            dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
            dict.extend_from_slice(word.as_bytes());
        }
        dict.extend_from_slice(TAIL.as_bytes());
        dict
    })
}

/// Encodes a header block (names lowercased, as SPDY requires) into the connection's
/// compression context.
fn encode_headers(zlib: &mut Compress, headers: &[(String, String)]) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        for part in [name.to_ascii_lowercase().as_bytes(), value.as_bytes()] {
            raw.extend_from_slice(&(part.len() as u32).to_be_bytes());
            raw.extend_from_slice(part);
        }
    }
    if zlib.total_in() == 0 {
        zlib.set_dictionary(dictionary()).context("setting the SPDY header dictionary")?;
    }
    let mut out = Vec::with_capacity(raw.len() + 64);
    let mut consumed = 0;
    loop {
        let before = zlib.total_in();
        zlib.compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync).context("compressing SPDY headers")?;
        consumed += (zlib.total_in() - before) as usize;
        // A sync flush is complete once it returns with output space to spare.
        if consumed == raw.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(256);
    }
}

/// Decodes one header block from the connection's decompression context.
fn decode_headers(zlib: &mut Decompress, block: &[u8]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(block.len() * 4 + 64);
    let mut consumed = 0;
    loop {
        let before = zlib.total_in();
        match zlib.decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync) {
            Ok(_) => {}
            Err(e) if e.needs_dictionary().is_some() => {
                zlib.set_dictionary(dictionary()).map(|_| ()).context("setting the SPDY header dictionary")?
            }
            Err(e) => bail!("corrupt SPDY header block: {e}"),
        }
        consumed += (zlib.total_in() - before) as usize;
        if consumed == block.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(256));
    }
    parse_header_block(&out)
}

fn parse_header_block(raw: &[u8]) -> Result<Vec<(String, String)>> {
    let mut at = 0;
    let mut next = |n: usize| -> Result<&[u8]> {
        let part = raw.get(at..at + n).context("truncated SPDY header block")?;
        at += n;
        Ok(part)
    };
    let count = u32::from_be_bytes(next(4)?.try_into()?);
    let mut headers = Vec::new();
    for _ in 0..count {
        let mut pair = [String::new(), String::new()];
        for part in &mut pair {
            let len = u32::from_be_bytes(next(4)?.try_into()?) as usize;
            *part = String::from_utf8_lossy(next(len)?).into_owned();
        }
        let [name, value] = pair;
        headers.push((name, value));
    }
    Ok(headers)
}

fn control_frame(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(data);
    frame
}

/// What the session's writer task sends.
enum Outgoing {
    Open { id: u32, headers: Vec<(String, String)> },
    Data { id: u32, data: Bytes, fin: bool },
    Raw(Vec<u8>),
}

type Inboxes = Arc<Mutex<HashMap<u32, mpsc::Sender<Bytes>>>>;

/// A client session over an upgraded connection. Streams the client opened and has not
/// finished are finished when the server sends GOAWAY (it is done), which lets a
/// kubelet-style server close the connection.
#[derive(Clone)]
pub struct Session {
    out: mpsc::Sender<Outgoing>,
    inboxes: Inboxes,
    next_id: Arc<Mutex<u32>>,
}

/// One stream: what the server sends on it (None once it finished or the connection
/// ended), and a writer for this side.
pub struct Stream {
    pub incoming: mpsc::Receiver<Bytes>,
    pub writer: StreamWriter,
}

#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Outgoing>,
}

impl StreamWriter {
    pub async fn send(&self, data: Bytes) -> Result<()> {
        self.out
            .send(Outgoing::Data { id: self.id, data, fin: false })
            .await
            .ok()
            .context("the SPDY connection is closed")
    }

    /// Half-closes this side of the stream.
    pub async fn finish(&self) {
        let _ = self.out.send(Outgoing::Data { id: self.id, data: Bytes::new(), fin: true }).await;
    }
}

impl Session {
    /// Starts the session's reader and writer tasks on `io`.
    pub fn start<IO: AsyncRead + AsyncWrite + Send + 'static>(io: IO) -> Session {
        let (read, write) = tokio::io::split(io);
        let (out, rx) = mpsc::channel(64);
        let inboxes: Inboxes = Arc::default();
        let session = Session { out: out.clone(), inboxes: inboxes.clone(), next_id: Arc::new(Mutex::new(1)) };
        tokio::spawn(write_loop(write, rx));
        let finisher = session.clone();
        tokio::spawn(async move {
            if let Err(e) = read_loop(read, inboxes.clone(), out, finisher).await {
                tracing::debug!(error = %e, "SPDY session ended");
            }
            inboxes.lock().unwrap().clear();
        });
        session
    }

    /// Opens a stream with `headers` (SYN_STREAM); the server's reply is not awaited.
    pub async fn open(&self, headers: &[(&str, &str)]) -> Result<Stream> {
        let id = {
            let mut next = self.next_id.lock().unwrap();
            let id = *next;
            *next += 2;
            id
        };
        let (tx, incoming) = mpsc::channel(64);
        self.inboxes.lock().unwrap().insert(id, tx);
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.out.send(Outgoing::Open { id, headers }).await.ok().context("the SPDY connection is closed")?;
        Ok(Stream { incoming, writer: StreamWriter { id, out: self.out.clone() } })
    }

    async fn finish_all(&self) {
        let last = *self.next_id.lock().unwrap();
        for id in (1..last).step_by(2) {
            StreamWriter { id, out: self.out.clone() }.finish().await;
        }
    }
}

async fn write_loop<W: AsyncWrite>(write: W, mut rx: mpsc::Receiver<Outgoing>) -> Result<()> {
    tokio::pin!(write);
    let mut zlib = Compress::new(Compression::best(), true);
    let mut finished = std::collections::HashSet::new();
    while let Some(item) = rx.recv().await {
        let frame = match item {
            Outgoing::Open { id, headers } => {
                let mut payload = Vec::new();
                payload.extend_from_slice(&id.to_be_bytes());
                payload.extend_from_slice(&0u32.to_be_bytes());
                payload.extend_from_slice(&[0, 0]);
                payload.extend_from_slice(&encode_headers(&mut zlib, &headers)?);
                control_frame(SYN_STREAM, 0, &payload)
            }
            Outgoing::Data { id, fin: true, .. } if !finished.insert(id) => continue,
            Outgoing::Data { id, data, fin } => data_frame(id, fin, &data),
            Outgoing::Raw(frame) => frame,
        };
        write.write_all(&frame).await?;
        if rx.is_empty() {
            write.flush().await?;
        }
    }
    Ok(())
}

async fn read_loop<R: AsyncRead>(
    read: R,
    inboxes: Inboxes,
    out: mpsc::Sender<Outgoing>,
    session: Session,
) -> Result<()> {
    tokio::pin!(read);
    let mut zlib = Decompress::new(true);
    loop {
        let mut head = [0u8; 8];
        match read.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            bail!("SPDY frame of {len} bytes");
        }
        let mut payload = vec![0u8; len];
        read.read_exact(&mut payload).await?;
        let word = |at: usize| {
            payload.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()) & 0x7fff_ffff).unwrap_or(0)
        };
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes(head[..4].try_into().unwrap());
            let inbox = inboxes.lock().unwrap().get(&id).cloned();
            if let Some(inbox) = inbox {
                if !payload.is_empty() {
                    let _ = inbox.send(Bytes::from(payload)).await;
                }
            }
            if flags & FLAG_FIN != 0 {
                inboxes.lock().unwrap().remove(&id);
            }
            continue;
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        match kind {
            SYN_STREAM => {
                decode_headers(&mut zlib, payload.get(10..).unwrap_or_default())?;
                let mut rst = word(0).to_be_bytes().to_vec();
                rst.extend_from_slice(&REFUSED_STREAM.to_be_bytes());
                let _ = out.send(Outgoing::Raw(control_frame(RST_STREAM, 0, &rst))).await;
            }
            SYN_REPLY | HEADERS => {
                decode_headers(&mut zlib, payload.get(4..).unwrap_or_default())?;
                if flags & FLAG_FIN != 0 {
                    inboxes.lock().unwrap().remove(&word(0));
                }
            }
            RST_STREAM => {
                inboxes.lock().unwrap().remove(&word(0));
            }
            PING => {
                let _ = out.send(Outgoing::Raw(control_frame(PING, 0, &payload))).await;
            }
            GOAWAY => session.finish_all().await,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        use sha2::Digest;
        let dict = dictionary();
        assert_eq!(dict.len(), 1423);
        let digest = sha2::Sha256::digest(dict);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02");
    }

    #[test]
    fn header_blocks_round_trip_through_one_context_per_direction() {
        let (mut compress, mut decompress) = (Compress::new(Compression::best(), true), Decompress::new(true));
        for round in 0..3 {
            let headers =
                vec![("StreamType".to_string(), "stdout".to_string()), ("port".to_string(), format!("80{round}"))];
            let block = encode_headers(&mut compress, &headers).unwrap();
            let decoded = decode_headers(&mut decompress, &block).unwrap();
            assert_eq!(
                decoded,
                vec![("streamtype".to_string(), "stdout".to_string()), ("port".to_string(), format!("80{round}"))]
            );
        }
    }

    #[test]
    fn a_truncated_header_block_is_an_error_not_a_panic() {
        assert!(parse_header_block(&[0, 0, 0, 2, 0, 0, 0, 9, b'a']).is_err());
    }

    #[tokio::test]
    async fn session_frames_streams_and_answers_pings() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let session = Session::start(client);
        let mut stream = session.open(&[("streamtype", "stdout")]).await.unwrap();
        stream.writer.send(Bytes::from_static(b"hi")).await.unwrap();
        stream.writer.finish().await;
        // SYN_STREAM for id 1, then data "hi", then an empty FIN data frame.
        let mut head = [0u8; 8];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!((head[0], head[3]), (0x80, SYN_STREAM as u8));
        let mut syn = vec![0u8; u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize];
        server.read_exact(&mut syn).await.unwrap();
        assert_eq!(u32::from_be_bytes(syn[..4].try_into().unwrap()), 1);
        let headers = decode_headers(&mut Decompress::new(true), &syn[10..]).unwrap();
        assert_eq!(headers, vec![("streamtype".to_string(), "stdout".to_string())]);
        let mut data = [0u8; 10];
        server.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, &[0, 0, 0, 1, 0, 0, 0, 2, b'h', b'i']);
        let mut fin = [0u8; 8];
        server.read_exact(&mut fin).await.unwrap();
        assert_eq!(&fin, &[0, 0, 0, 1, FLAG_FIN, 0, 0, 0]);
        // Server data reaches the stream; a ping is echoed; FIN ends the stream.
        server.write_all(&data_frame(1, false, b"out")).await.unwrap();
        server.write_all(&control_frame(PING, 0, &2u32.to_be_bytes())).await.unwrap();
        server.write_all(&data_frame(1, true, b"")).await.unwrap();
        assert_eq!(stream.incoming.recv().await.unwrap(), Bytes::from_static(b"out"));
        assert!(stream.incoming.recv().await.is_none());
        let mut ping = [0u8; 12];
        server.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, &control_frame(PING, 0, &2u32.to_be_bytes())[..]);
    }
}

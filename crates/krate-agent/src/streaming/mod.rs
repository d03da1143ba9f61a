//! `kubectl exec`, `attach` and `port-forward` on the node: the API server forwards the
//! client's upgrade request here unchanged; the agent asks CRI for a streaming URL
//! (containerd's streaming server, on 127.0.0.1) and joins the two connections.
//!
//! What the client speaks decides how:
//! - WebSocket `v5.channel.k8s.io` / `v4.channel.k8s.io` (kubectl's exec and attach; also the
//!   first `channel.k8s.io`):
//!   channel-prefixed messages, translated to a SPDY session with containerd — SPDY
//!   streams can be half-closed, which v5's stdin CLOSE signal needs and containerd's own
//!   (v4) WebSocket server cannot express.
//! - WebSocket `SPDY/3.1+portforward.k8s.io` (kubectl's port-forward): SPDY carried in
//!   binary messages; unwrapped onto a SPDY connection with containerd.
//! - SPDY (older clients, kubectl's fallback): the bytes are piped through as they are.

pub mod spdy;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::cri::{api, Cri};
use crate::pods::spec;

const STREAM_PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
const CHANNEL_V5: &str = "v5.channel.k8s.io";
const CHANNEL_V4: &str = "v4.channel.k8s.io";
/// The first channel protocol (its frames are v4's; the error channel carries text),
/// which upstream's e2e suite and older clients still offer.
const CHANNEL_V1: &str = "channel.k8s.io";
const PORT_FORWARD: &str = "portforward.k8s.io";
const PORT_FORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// v5's signal that the client closed a stream: `[CLOSE, stream]`.
const CHANNEL_CLOSE: u8 = 255;
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Which streaming request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Exec,
    Attach,
    PortForward,
}

/// The streams asked for, from the query (`command`, `stdin`, `stdout`, `stderr`, `tty`).
#[derive(Clone, Debug, Default, PartialEq)]
struct StreamOptions {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
    /// Port-forward's `ports` (repeated or comma-separated).
    ports: Vec<u16>,
}

impl StreamOptions {
    fn from_query(query: &str) -> StreamOptions {
        let mut opts = StreamOptions::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let on = matches!(value.as_ref(), "1" | "true" | "True");
            match key.as_ref() {
                "command" => opts.command.push(value.into_owned()),
                "input" | "stdin" => opts.stdin = on,
                "output" | "stdout" => opts.stdout = on,
                "error" | "stderr" => opts.stderr = on,
                "tty" => opts.tty = on,
                "ports" | "port" => opts.ports.extend(value.split(',').filter_map(|p| p.trim().parse::<u16>().ok())),
                _ => {}
            }
        }
        // With a terminal, stderr is merged into stdout.
        opts.stderr &= !opts.tty;
        opts
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Serves one exec/attach/port-forward request for `namespace/pod` (and `container`).
pub async fn serve(
    mut req: Request<hyper::body::Incoming>,
    mut cri: Cri,
    action: Action,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> Response<Body> {
    let query = req.uri().query().unwrap_or_default().to_string();
    let opts = StreamOptions::from_query(&query);
    let upgrade =
        req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    let offered = header_list(req.headers(), "Sec-WebSocket-Protocol");
    let url = match streaming_url(&mut cri, action, namespace, pod, container, &opts).await {
        Ok(url) => url,
        Err((status, message)) => return text(status, message),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    if upgrade == "websocket" {
        let wanted: &[&str] = if action == Action::PortForward {
            &[PORT_FORWARD_TUNNEL, CHANNEL_V5, CHANNEL_V4, CHANNEL_V1]
        } else {
            &[CHANNEL_V5, CHANNEL_V4, CHANNEL_V1]
        };
        let Some(protocol) = wanted.iter().find(|p| offered.iter().any(|o| o == *p)).copied() else {
            return text(StatusCode::BAD_REQUEST, format!("unable to upgrade: none of the offered WebSocket protocols {offered:?} is supported; this agent speaks {wanted:?}"));
        };
        if action == Action::PortForward && protocol != PORT_FORWARD_TUNNEL && opts.ports.is_empty() {
            return text(
                StatusCode::BAD_REQUEST,
                "port-forward over channels needs the ports to forward: add ports=<port>[,<port>...] to the query",
            );
        }
        let Some(key) = req.headers().get("Sec-WebSocket-Key") else {
            return text(StatusCode::BAD_REQUEST, "unable to upgrade: missing Sec-WebSocket-Key");
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        tokio::spawn(async move {
            let Ok(io) = on_upgrade.await else { return };
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
            let result = match (protocol, action) {
                (PORT_FORWARD_TUNNEL, _) => tunnel(ws, &url).await,
                (_, Action::PortForward) => port_channels(ws, &url, &opts.ports, protocol == CHANNEL_V5).await,
                _ => channels(ws, &url, &opts, protocol).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "streaming session ended with an error");
            }
        });
        let mut response = switching_to("websocket");
        let headers = response.headers_mut();
        headers.insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        headers.insert("Sec-WebSocket-Accept", HeaderValue::from_str(&accept).expect("base64 is a valid header value"));
        return response;
    }
    if upgrade.starts_with("spdy/") {
        let protocols = header_list(req.headers(), STREAM_PROTOCOL_HEADER);
        let (runtime, chosen) = match dial(&url, &protocols).await {
            Ok(dialed) => dialed,
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("connecting to the container runtime's streaming server: {e:#}"),
                )
            }
        };
        tokio::spawn(pipe(on_upgrade, runtime));
        let mut response = switching_to("SPDY/3.1");
        if let Some(chosen) = chosen {
            response.headers_mut().insert(STREAM_PROTOCOL_HEADER, chosen);
        }
        return response;
    }
    text(
        StatusCode::BAD_REQUEST,
        "Upgrade request required: connect with a WebSocket (v5.channel.k8s.io) or SPDY/3.1 client such as kubectl",
    )
}

/// The values of a comma-separated list header, possibly given over several headers
/// (the protocols a WebSocket or SPDY client offers).
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// A `101 Switching Protocols` answer to `upgrade`.
fn switching_to(upgrade: &'static str) -> Response<Body> {
    let mut response = Response::new(http_body_util::Empty::new().boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(upgrade));
    response
}

/// Asks CRI for the streaming URL of the request. Errors carry the HTTP status to answer.
async fn streaming_url(
    cri: &mut Cri,
    action: Action,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
    opts: &StreamOptions,
) -> Result<String, (StatusCode, String)> {
    let internal = |e: tonic::Status| (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string());
    if action == Action::PortForward {
        let sandboxes = cri
            .sandboxes_labelled(&[(spec::POD_NAMESPACE, namespace), (spec::POD_NAME, pod)])
            .await
            .map_err(internal)?;
        let ready = sandboxes
            .iter()
            .filter(|s| s.state == api::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at);
        let sandbox = ready.ok_or_else(|| {
            (StatusCode::NOT_FOUND, format!("pod {namespace}/{pod} has no running sandbox on this node"))
        })?;
        let request = api::PortForwardRequest { pod_sandbox_id: sandbox.id.clone(), port: vec![] };
        return Ok(cri.runtime.port_forward(request).await.map_err(internal)?.into_inner().url);
    }
    let container = container.unwrap_or_default();
    let list = cri
        .containers_labelled(&[
            (spec::POD_NAMESPACE, namespace),
            (spec::POD_NAME, pod),
            (spec::CONTAINER_NAME, container),
        ])
        .await
        .map_err(internal)?;
    let running = list.first().filter(|c| c.state == api::ContainerState::ContainerRunning as i32);
    let Some(target) = running else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("container not found (\"{container}\"): it is not running in pod {namespace}/{pod}"),
        ));
    };
    let id = target.id.clone();
    if action == Action::Attach {
        let request = api::AttachRequest {
            container_id: id,
            stdin: opts.stdin,
            tty: opts.tty,
            stdout: opts.stdout,
            stderr: opts.stderr,
        };
        return Ok(cri.runtime.attach(request).await.map_err(internal)?.into_inner().url);
    }
    if opts.command.is_empty() {
        return Err((StatusCode::BAD_REQUEST, "you must specify at least one command for the container".to_string()));
    }
    let request = api::ExecRequest {
        container_id: id,
        cmd: opts.command.clone(),
        tty: opts.tty,
        stdin: opts.stdin,
        stdout: opts.stdout,
        stderr: opts.stderr,
    };
    Ok(cri.runtime.exec(request).await.map_err(internal)?.into_inner().url)
}

/// Opens a SPDY connection to the runtime's streaming `url`, offering `protocols`;
/// returns it with the protocol the runtime chose.
async fn dial(url: &str, protocols: &[String]) -> Result<(Upgraded, Option<HeaderValue>)> {
    let uri: http::Uri = url.parse().with_context(|| format!("the runtime's streaming URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!(
            "streaming URL {url} is not plain HTTP on this node; only containerd's local streaming server is supported"
        );
    }
    let authority = uri.authority().context("streaming URL without a host")?.clone();
    let tcp = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection.with_upgrades());
    let mut request = Request::post(uri.path())
        .header(header::HOST, authority.as_str())
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1");
    for protocol in protocols {
        request = request.header(STREAM_PROTOCOL_HEADER, protocol);
    }
    let response = sender.send_request(request.body(http_body_util::Empty::<Bytes>::new())?).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let chosen = response.headers().get(STREAM_PROTOCOL_HEADER).cloned();
    Ok((hyper::upgrade::on(response).await?, chosen))
}

/// Joins the client's upgraded connection and the runtime's, byte for byte.
async fn pipe(client: OnUpgrade, runtime: Upgraded) {
    let Ok(client) = client.await else { return };
    let (mut client, mut runtime) = (TokioIo::new(client), TokioIo::new(runtime));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut runtime).await;
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;

fn closing() -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))
}

/// A SPDY session with the runtime speaking `protocol`; if there is none, the WebSocket
/// client is told why and closed.
async fn runtime_session(
    url: &str,
    protocol: &str,
    ws: &mut futures::stream::SplitSink<Socket, Message>,
) -> Option<spdy::Session> {
    match dial(url, &[protocol.to_string()]).await {
        Ok((io, _)) => Some(spdy::Session::start(TokioIo::new(io))),
        Err(e) => {
            fail(ws, format!("connecting to the container runtime's streaming server: {e:#}")).await;
            None
        }
    }
}

/// Whether `headers` ask for a WebSocket.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Serves `chunks` (a container's log) over a WebSocket, as upstream's API server streams
/// `pods/log` to a WebSocket client: each chunk one binary message (`binary.k8s.io`, or no
/// protocol), or base64 in a text message (`base64.binary.k8s.io`); a close at the end.
pub fn stream_websocket(req: &mut Request<hyper::body::Incoming>, mut chunks: mpsc::Receiver<Bytes>) -> Response<Body> {
    const BINARY: &str = "binary.k8s.io";
    const BASE64: &str = "base64.binary.k8s.io";
    let offered = header_list(req.headers(), "Sec-WebSocket-Protocol");
    let protocol = offered.iter().find(|p| *p == BINARY || *p == BASE64).cloned();
    if protocol.is_none() && !offered.is_empty() {
        return text(StatusCode::BAD_REQUEST, format!("unable to upgrade: none of the offered WebSocket protocols {offered:?} is supported; logs speak [{BINARY:?}, {BASE64:?}]"));
    }
    let Some(key) = req.headers().get("Sec-WebSocket-Key") else {
        return text(StatusCode::BAD_REQUEST, "unable to upgrade: missing Sec-WebSocket-Key");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let base64 = protocol.as_deref() == Some(BASE64);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(io) = on_upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
        while let Some(chunk) = chunks.recv().await {
            let message = if base64 {
                use base64::Engine;
                Message::Text(base64::engine::general_purpose::STANDARD.encode(&chunk).into())
            } else {
                Message::Binary(chunk)
            };
            if ws.send(message).await.is_err() {
                return;
            }
        }
        let _ = ws.send(closing()).await;
    });
    let mut response = switching_to("websocket");
    let headers = response.headers_mut();
    if let Some(protocol) = protocol {
        headers.insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&protocol).expect("a known protocol"));
    }
    headers.insert("Sec-WebSocket-Accept", HeaderValue::from_str(&accept).expect("base64 is a valid header value"));
    response
}

/// Tells a WebSocket client why its session failed (on the error channel, as a Status)
/// and closes.
async fn fail(ws: &mut futures::stream::SplitSink<Socket, Message>, message: String) {
    let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500});
    let mut frame = vec![ERROR];
    frame.extend_from_slice(&serde_json::to_vec(&status).unwrap_or_default());
    let _ = ws.send(Message::Binary(frame.into())).await;
    let _ = ws.send(closing()).await;
}

/// The client's next data message; None once it closed or the connection ended
/// (pings are answered by the WebSocket layer). Text frames count as binary ones, as
/// upstream's reader ignores the frame type: the Python client sends stdin as text
/// frames whose first character is the channel's byte.
async fn next_binary(source: &mut futures::stream::SplitStream<Socket>) -> Option<Bytes> {
    while let Some(Ok(message)) = source.next().await {
        match message {
            Message::Binary(data) => return Some(data),
            Message::Text(text) => return Some(text.into()),
            Message::Close(_) => return None,
            _ => {}
        }
    }
    None
}

/// Sends what a runtime stream carries as messages on `channel`, until it ends.
async fn forward(mut incoming: mpsc::Receiver<Bytes>, channel: u8, frames: mpsc::Sender<Message>) {
    while let Some(data) = incoming.recv().await {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(&data);
        if frames.send(Message::Binary(frame.into())).await.is_err() {
            return;
        }
    }
}

/// The one writer of a WebSocket: sends queued messages until (and including) a Close.
async fn write_frames(mut sink: futures::stream::SplitSink<Socket, Message>, mut outgoing: mpsc::Receiver<Message>) {
    while let Some(message) = outgoing.recv().await {
        let close = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || close {
            break;
        }
    }
}

/// What the error channel carries at the end of an exec or attach: v4 and v5 send the
/// runtime's Status (JSON, success too); the first protocol sends a failure's message as
/// text and nothing on success (upstream's `channel.k8s.io`).
fn final_status(status: Vec<u8>, structured: bool) -> Option<Vec<u8>> {
    if structured {
        return Some(status);
    }
    let parsed: serde_json::Value = serde_json::from_slice(&status).ok()?;
    if parsed["status"] == "Success" {
        return None;
    }
    Some(parsed["message"].as_str().map(|m| m.as_bytes().to_vec()).unwrap_or(status))
}

/// Exec/attach over WebSocket channels, translated to a SPDY session with the runtime.
async fn channels(ws: Socket, url: &str, opts: &StreamOptions, protocol: &str) -> Result<()> {
    let v5 = protocol == CHANNEL_V5;
    let structured = protocol != CHANNEL_V1;
    let (mut sink, mut source) = ws.split();
    let Some(session) = runtime_session(url, CHANNEL_V4, &mut sink).await else { return Ok(()) };
    // The runtime waits for exactly the streams the request named, error first.
    let mut error = session.open(&[("streamtype", "error")]).await?;
    let open = |wanted: bool, kind: &'static str| {
        let session = session.clone();
        async move {
            if wanted {
                session.open(&[("streamtype", kind)]).await.map(Some)
            } else {
                Ok(None)
            }
        }
    };
    let stdin = open(opts.stdin, "stdin").await?;
    let stdout = open(opts.stdout, "stdout").await?;
    let stderr = open(opts.stderr, "stderr").await?;
    let resize = open(opts.tty, "resize").await?;

    let (frames, outgoing) = mpsc::channel::<Message>(16);
    let pump = |stream: Option<spdy::Stream>, channel: u8| {
        let frames = frames.clone();
        async move {
            if let Some(stream) = stream {
                forward(stream.incoming, channel, frames).await;
            }
        }
    };
    let (stdout, stderr) = (pump(stdout, STDOUT), pump(stderr, STDERR));
    let output = async move {
        futures::join!(stdout, stderr);
        // The status comes last, after every byte of output.
        let mut status = Vec::new();
        while let Some(data) = error.incoming.recv().await {
            status.extend_from_slice(&data);
        }
        if let Some(payload) = final_status(status, structured).filter(|p| !p.is_empty()) {
            let frame: Vec<u8> = std::iter::once(ERROR).chain(payload).collect();
            let _ = frames.send(Message::Binary(frame.into())).await;
        }
        let _ = frames.send(closing()).await;
    };
    let writer = write_frames(sink, outgoing);
    let (stdin_writer, resize_writer) = (stdin.map(|s| s.writer), resize.map(|s| s.writer));
    let input = async move {
        while let Some(data) = next_binary(&mut source).await {
            match (data.first().copied(), &stdin_writer, &resize_writer) {
                (Some(STDIN), Some(stdin), _) => stdin.send(data.slice(1..)).await?,
                (Some(RESIZE), _, Some(resize)) => resize.send(data.slice(1..)).await?,
                (Some(CHANNEL_CLOSE), Some(stdin), _) if v5 && data.get(1) == Some(&STDIN) => stdin.finish().await,
                _ => {}
            }
        }
        // The client is gone: its stdin ends (so a shell it ran exits).
        if let Some(stdin) = &stdin_writer {
            stdin.finish().await;
        }
        anyhow::Ok(())
    };
    let (_, _, input) = futures::join!(output, writer, input);
    input
}

/// Port-forward over WebSocket channels: per port, data on channel 2i and errors on
/// 2i+1, each channel first announcing its port (little-endian); one SPDY data/error
/// stream pair with the runtime per port.
async fn port_channels(ws: Socket, url: &str, ports: &[u16], v5: bool) -> Result<()> {
    let (mut sink, mut source) = ws.split();
    let Some(session) = runtime_session(url, PORT_FORWARD, &mut sink).await else { return Ok(()) };
    let (frames, outgoing) = mpsc::channel::<Message>(16);
    let mut writers = Vec::new();
    let mut pumps = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (port_text, request) = (port.to_string(), i.to_string());
        let error = session.open(&[("streamtype", "error"), ("port", &port_text), ("requestid", &request)]).await?;
        let data = session.open(&[("streamtype", "data"), ("port", &port_text), ("requestid", &request)]).await?;
        writers.push(data.writer);
        let (data_channel, error_channel) = (2 * i as u8, 2 * i as u8 + 1);
        for channel in [data_channel, error_channel] {
            let [lo, hi] = port.to_le_bytes();
            frames.send(Message::Binary(vec![channel, lo, hi].into())).await?;
        }
        pumps.push(forward(data.incoming, data_channel, frames.clone()));
        pumps.push(forward(error.incoming, error_channel, frames.clone()));
    }
    let output = async move {
        futures::future::join_all(pumps).await;
        let _ = frames.send(closing()).await;
    };
    let writer = write_frames(sink, outgoing);
    let input = async move {
        while let Some(data) = next_binary(&mut source).await {
            match data.first().copied() {
                Some(CHANNEL_CLOSE) if v5 => {
                    if let Some(w) = data.get(1).and_then(|ch| writers.get(*ch as usize / 2)) {
                        w.finish().await;
                    }
                }
                Some(channel) if channel % 2 == 0 => {
                    if let Some(w) = writers.get(channel as usize / 2) {
                        w.send(data.slice(1..)).await?;
                    }
                }
                _ => {}
            }
        }
        for w in &writers {
            w.finish().await;
        }
        anyhow::Ok(())
    };
    let (_, _, input) = futures::join!(output, writer, input);
    input
}

/// Port-forward over WebSocket: the binary messages carry a SPDY connection, which is
/// unwrapped onto a SPDY connection with the runtime.
async fn tunnel(ws: Socket, url: &str) -> Result<()> {
    let (mut sink, mut source) = ws.split();
    let runtime = match dial(url, &[PORT_FORWARD.to_string()]).await {
        Ok((io, _)) => io,
        Err(e) => {
            let _ = sink.send(closing()).await;
            bail!("connecting to the container runtime's streaming server: {e:#}");
        }
    };
    let (mut from_runtime, mut to_runtime) = tokio::io::split(TokioIo::new(runtime));
    let upstream = async move {
        while let Some(data) = next_binary(&mut source).await {
            to_runtime.write_all(&data).await?;
        }
        to_runtime.shutdown().await?;
        anyhow::Ok(())
    };
    let downstream = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = from_runtime.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sink.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await?;
        }
        let _ = sink.send(closing()).await;
        anyhow::Ok(())
    };
    let (up, down) = futures::join!(upstream, downstream);
    up.and(down)
}

/// Parses `/exec|attach/{namespace}/{pod}/{container}` and `/portForward/{namespace}/{pod}`.
pub fn route(parts: &[&str]) -> Option<(Action, String, String, Option<String>)> {
    match parts {
        ["exec", ns, pod, container] | ["exec", ns, pod, _, container] => {
            Some((Action::Exec, ns.to_string(), pod.to_string(), Some(container.to_string())))
        }
        ["attach", ns, pod, container] | ["attach", ns, pod, _, container] => {
            Some((Action::Attach, ns.to_string(), pod.to_string(), Some(container.to_string())))
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
            Some((Action::PortForward, ns.to_string(), pod.to_string(), None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_query_and_a_tty_merges_stderr() {
        let opts = StreamOptions::from_query(
            "command=sh&command=-c&command=echo%20hi&stdin=true&stdout=1&stderr=true&tty=true",
        );
        assert_eq!(
            opts,
            StreamOptions {
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true,
                ports: vec![]
            }
        );
        assert_eq!(StreamOptions::from_query("ports=80%2C1234&ports=9").ports, vec![80, 1234, 9]);
        let opts = StreamOptions::from_query("command=ls&output=1&error=1");
        assert_eq!((opts.stdout, opts.stderr, opts.stdin), (true, true, false));
    }

    #[test]
    fn the_first_channel_protocol_gets_a_failures_message_and_nothing_on_success() {
        let success = br#"{"metadata":{},"status":"Success"}"#.to_vec();
        let failure =
            br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code"}"#.to_vec();
        assert_eq!(final_status(success.clone(), true), Some(success.clone()), "v4 and v5 get the Status");
        assert_eq!(final_status(success, false), None);
        assert_eq!(final_status(failure, false), Some(b"command terminated with non-zero exit code".to_vec()));
    }

    #[test]
    fn routes_follow_the_kubelet_paths() {
        assert_eq!(route(&["exec", "ns", "p", "c"]), Some((Action::Exec, "ns".into(), "p".into(), Some("c".into()))));
        assert_eq!(route(&["portForward", "ns", "p"]).map(|r| r.0), Some(Action::PortForward));
        assert_eq!(route(&["attach", "ns", "p", "uid", "c"]).map(|r| r.3), Some(Some("c".into())));
        assert_eq!(route(&["exec", "ns"]), None);
    }
}

//! HTTPS servers of the tests' own (admission webhooks, extension API servers): a CA
//! made for the server, a certificate for its names, HTTP/1.1 keep-alive on 127.0.0.1,
//! one thread per connection, and a handler that turns each request into an answer.
//! With `client_ca`, a client must present a certificate signed by it, and the handler
//! sees its common name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use base64::Engine;

/// One request as the handler sees it.
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The common name of the client's certificate, when it presented one.
    pub client: Option<String>,
}

impl Request {
    /// Every value of header `name` (lower case).
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }
}

/// An answer: status code, content type, body.
pub type Answer = (u16, &'static str, String);

pub type Handler = Arc<dyn Fn(&Request) -> Answer + Send + Sync>;

pub struct HttpsServer {
    pub port: u16,
    /// The server CA's certificate, base64 of its PEM (what `caBundle` fields take).
    pub ca_bundle: String,
}

impl HttpsServer {
    /// Serves `handler` on 127.0.0.1 with a certificate for `names` (DNS names or IP
    /// addresses), requiring client certificates signed by `client_ca` (PEM) when given.
    pub fn start(names: &[&str], client_ca: Option<&str>, handler: Handler) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), names, client_ca, handler)
    }

    /// `start` on a listener of the caller's (one in a pod's network namespace).
    pub fn start_on(listener: TcpListener, names: &[&str], client_ca: Option<&str>, handler: Handler) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test-server-ca");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), &ca_key).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = Arc::new(builder.with_single_cert(chain, key_der).unwrap());
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, handler) = (config.clone(), handler.clone());
                std::thread::spawn(move || serve(stream, config, handler));
            }
        });
        let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_cert.pem());
        Self { port, ca_bundle }
    }
}

/// The common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// Serves the requests of one connection until the client closes it.
fn serve(stream: TcpStream, config: Arc<rustls::ServerConfig>, handler: Handler) {
    let Ok(connection) = rustls::ServerConnection::new(config) else { return };
    let _ = stream.set_nodelay(true);
    let mut tls = rustls::StreamOwned::new(connection, stream);
    loop {
        let mut reader = BufReader::new(&mut tls);
        let mut line = String::new();
        if reader.read_line(&mut line).map(|n| n == 0).unwrap_or(true) {
            return;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("GET").to_string();
        let target = words.next().unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let (path, query) = (path.to_string(), query.to_string());
        let (mut headers, mut length, mut close) = (Vec::new(), 0, false);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).map(|n| n == 0).unwrap_or(true) || header == "\r\n" {
                break;
            }
            let Some((name, value)) = header.trim_end().split_once(':') else { continue };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            }
            close |= name == "connection" && value.to_ascii_lowercase().contains("close");
            headers.push((name, value));
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // The reader holds no bytes of a next request: the API server's clients send
        // one request at a time on a connection.
        drop(reader);
        let client = tls.conn.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
        let request = Request { method, path, query, headers, body, client };
        let (code, content_type, answer) = handler(&request);
        let text = format!(
            "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{answer}",
            if code < 400 { "OK" } else { "Error" },
            answer.len()
        );
        if tls.write_all(text.as_bytes()).and_then(|_| tls.flush()).is_err() || close {
            return;
        }
    }
}

//! Test PKI and TLS clients: a CA and leaf certificates made at test time (rcgen), and
//! HTTP/1.1 and h2 clients over TLS that verify the chain.
//!
//! - [`TestCa`] makes a root CA (or an intermediate under one) and issues leaves
//!   ([`LeafSpec`]: key type, names, validity) as PEM files a router can load.
//! - [`TlsClient`] is a rustls client (ring provider only) trusting one CA, with chosen ALPN
//!   protocols, TLS versions and cipher suites. [`TlsClient::handshake`] reports what was
//!   negotiated ([`TlsInfo`], including the leaf the server presented);
//!   [`TlsClient::connect`] opens a [`TlsConn`] that sends requests over HTTP/1.1 or h2 as
//!   ALPN decided and stays open across requests; [`TlsClient::request`] does one exchange.
//! - [`client_hello`] and [`raw_reply`] speak just enough TLS by hand to offer what rustls
//!   clients never offer (CBC suites, TLS 1.0) and read the server's first answer.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, header::HOST, response::Parts};
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use rustls::{
    CipherSuite, ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion,
    client::Resumption,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::TestBody;

/// Longest a test handshake or exchange may take before it counts as hung.
const IO_LIMIT: Duration = Duration::from_secs(5);

/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sets a certificate's validity window from epoch seconds (whole seconds, as X.509
/// stores them), without naming the `time` crate rcgen uses.
fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(not_before as u64);
    params.not_after = epoch + Duration::from_secs(not_after as u64);
}

// ---------------------------------------------------------------------------------------
// Certificates

/// The key type of a leaf certificate. The ring provider cannot generate RSA keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyKind {
    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// What a leaf certificate should be: by default an ECDSA P-256 key for `localhost` and
/// `127.0.0.1`, valid from an hour ago for 30 days.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Subject alternative names: DNS names, or IP addresses in text form.
    pub names: Vec<String>,
    pub key: KeyKind,
    /// Epoch seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub common_name: String,
}

impl Default for LeafSpec {
    fn default() -> Self {
        let now = unix_now();
        LeafSpec {
            names: vec!["localhost".into(), "127.0.0.1".into()],
            key: KeyKind::EcdsaP256,
            not_before: now - 3600,
            not_after: now + 30 * 86_400,
            common_name: "localhost".into(),
        }
    }
}

impl LeafSpec {
    pub fn key(mut self, key: KeyKind) -> Self {
        self.key = key;
        self
    }

    pub fn names(mut self, names: &[&str]) -> Self {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Valid from `not_before` to `not_after` (epoch seconds).
    pub fn valid(mut self, not_before: i64, not_after: i64) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Valid from now (less an hour) for `days` days.
    pub fn days(self, days: i64) -> Self {
        let now = unix_now();
        self.valid(now - 3600, now + days * 86_400)
    }

    /// Expired two days ago.
    pub fn expired(self) -> Self {
        let now = unix_now();
        self.valid(now - 30 * 86_400, now - 2 * 86_400)
    }

    /// Valid only from three days from now.
    pub fn not_yet_valid(self) -> Self {
        let now = unix_now();
        self.valid(now + 3 * 86_400, now + 30 * 86_400)
    }

    pub fn common_name(mut self, cn: &str) -> Self {
        self.common_name = cn.into();
        self
    }
}

/// A leaf certificate and its key, as the files a server loads.
pub struct Leaf {
    pub der: CertificateDer<'static>,
    /// The leaf alone.
    pub cert_pem: String,
    /// The leaf, then the intermediates up to (not including) the root: what a server's
    /// certificate file should hold.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// The validity window, in epoch seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl Leaf {
    /// The two files a router config names, for [`super::Router::try_start`]:
    /// `{stem}.crt` (the chain) and `{stem}.key`.
    pub fn files<'a>(&'a self, stem: &str) -> [(String, &'a [u8]); 2] {
        [
            (format!("{stem}.crt"), self.chain_pem.as_bytes()),
            (format!("{stem}.key"), self.key_pem.as_bytes()),
        ]
    }
}

/// A certificate authority made for one test: a self-signed root, or an intermediate
/// issued by another `TestCa`.
pub struct TestCa {
    /// This CA's certificate.
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    /// The root certificate clients must trust (this one, for a root).
    pub root: CertificateDer<'static>,
    pub root_pem: String,
    /// PEM of this CA and its parents below the root (empty for a root): what a server
    /// sends after its leaf.
    chain_below_root: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A root CA named `name`, valid from a day ago for ten years.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name);
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        TestCa {
            root: der.clone(),
            root_pem: cert.pem(),
            cert_pem: cert.pem(),
            der,
            chain_below_root: String::new(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA issued by this one.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params(name);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TestCa {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            root: self.root.clone(),
            root_pem: self.root_pem.clone(),
            chain_below_root: format!("{}{}", cert.pem(), self.chain_below_root),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf as `spec` describes, signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        let key = KeyPair::generate_for(spec.key.algorithm()).unwrap();
        let mut params = CertificateParams::new(spec.names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.clone());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, spec.not_before, spec.not_after);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_below_root),
            key_pem: key.serialize_pem(),
            not_before: spec.not_before,
            not_after: spec.not_after,
        }
    }

    /// A default leaf: ECDSA P-256, `localhost` and `127.0.0.1`, valid for 30 days.
    pub fn leaf(&self) -> Leaf {
        self.issue(&LeafSpec::default())
    }

    /// A client that trusts this CA's root, with default settings (see [`TlsClient`]).
    pub fn client(&self) -> TlsClient {
        TlsClient::new(self)
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = unix_now();
    set_validity(&mut params, now - 86_400, now + 3650 * 86_400);
    params
}

// ---------------------------------------------------------------------------------------
// Clients

/// What a handshake settled on.
#[derive(Clone, Debug)]
pub struct TlsInfo {
    /// The ALPN protocol the server picked (`h2`, `http/1.1`), if any.
    pub alpn: Option<String>,
    pub version: ProtocolVersion,
    pub suite: CipherSuite,
    /// The certificates the server presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl TlsInfo {
    /// The leaf the server presented.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// A TLS client (rustls, ring provider only) that verifies the server's chain against one
/// root and the server name. By default it offers ALPN `h2` and `http/1.1`, TLS 1.3 and
/// 1.2, every suite of the ring provider, and expects the name `localhost`. Session
/// resumption is off, so every handshake shows the certificate served at that moment.
#[derive(Clone)]
pub struct TlsClient {
    roots: Vec<CertificateDer<'static>>,
    pub alpn: Vec<Vec<u8>>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
    /// Offer only these suites (`None`: all of the provider's).
    pub suites: Option<Vec<CipherSuite>>,
    pub server_name: String,
}

impl TlsClient {
    pub fn new(ca: &TestCa) -> TlsClient {
        TlsClient {
            roots: vec![ca.root.clone()],
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
            suites: None,
            server_name: "localhost".into(),
        }
    }

    /// Offers only these ALPN protocols (none: no ALPN extension).
    pub fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }

    /// Offers only HTTP/1.1.
    pub fn h1(self) -> Self {
        self.alpn(&["http/1.1"])
    }

    /// Offers only h2.
    pub fn h2(self) -> Self {
        self.alpn(&["h2"])
    }

    pub fn versions(mut self, versions: &[&'static SupportedProtocolVersion]) -> Self {
        self.versions = versions.to_vec();
        self
    }

    pub fn tls12_only(self) -> Self {
        self.versions(&[&rustls::version::TLS12])
    }

    pub fn tls13_only(self) -> Self {
        self.versions(&[&rustls::version::TLS13])
    }

    pub fn suites(mut self, suites: &[CipherSuite]) -> Self {
        self.suites = Some(suites.to_vec());
        self
    }

    /// The name the server's certificate must be valid for (a DNS name or an IP).
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.into();
        self
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(only) = &self.suites {
            provider.cipher_suites.retain(|s| only.contains(&s.suite()));
        }
        let mut roots = RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&self.versions)
            .expect("the offered suites cover the offered versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = self.alpn.clone();
        config.resumption = Resumption::disabled();
        Arc::new(config)
    }

    /// Connects to `addr` and completes a handshake. Errors (as text) when it fails or
    /// does not finish within 5 s.
    pub async fn handshake(
        &self,
        addr: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, TlsInfo), String> {
        let name = ServerName::try_from(self.server_name.clone()).map_err(|e| e.to_string())?;
        let connector = TlsConnector::from(self.config());
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))
        };
        let stream = tokio::time::timeout(IO_LIMIT, attempt)
            .await
            .map_err(|_| format!("handshake with {addr} not done within {IO_LIMIT:?}"))??;
        let (_, conn) = stream.get_ref();
        let info = TlsInfo {
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            version: conn.protocol_version().expect("version after handshake"),
            suite: conn
                .negotiated_cipher_suite()
                .expect("suite after handshake")
                .suite(),
            chain: conn
                .peer_certificates()
                .expect("server certificates")
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        };
        Ok((stream, info))
    }

    /// The leaf a new connection to `addr` is served; panics if the handshake fails.
    pub async fn served_leaf(&self, addr: SocketAddr) -> CertificateDer<'static> {
        let (_, info) = self.handshake(addr).await.expect("handshake");
        info.leaf().clone()
    }

    /// Opens a connection that speaks h2 if ALPN picked it, else HTTP/1.1.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TlsConn, String> {
        let (stream, info) = self.handshake(addr).await?;
        let io = TokioIo::new(stream);
        let authority = format!("{}:{}", self.server_name, addr.port());
        let (sender, task) = if info.alpn.as_deref() == Some("h2") {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            (
                Sender::H2(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| format!("http1 handshake: {e}"))?;
            (
                Sender::H1(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        };
        Ok(TlsConn {
            info,
            sender,
            authority,
            task,
        })
    }

    /// One request on a new connection: connects, sends `req` (its URI a path, such as
    /// `/api/v1/endpoint/e/score`) and reads the whole response.
    pub async fn request(
        &self,
        addr: SocketAddr,
        req: Request<TestBody>,
    ) -> Result<Exchange, String> {
        let mut conn = self.connect(addr).await?;
        let (parts, body) = conn.send(req).await?;
        Ok(Exchange {
            parts,
            body,
            info: conn.info.clone(),
        })
    }
}

/// A response over TLS and what its connection negotiated.
pub struct Exchange {
    pub parts: Parts,
    pub body: Bytes,
    pub info: TlsInfo,
}

enum Sender {
    H1(http1::SendRequest<TestBody>),
    H2(http2::SendRequest<TestBody>),
}

/// One open TLS connection; requests go over it one after the other (HTTP/1.1) or
/// multiplexed (h2).
pub struct TlsConn {
    pub info: TlsInfo,
    sender: Sender,
    /// `host:port` for the `Host` header (HTTP/1.1) or `:authority` (h2).
    authority: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsConn {
    /// Sends `req` (its URI a path) on this connection and reads the whole response.
    pub async fn send(&mut self, req: Request<TestBody>) -> Result<(Parts, Bytes), String> {
        let (mut head, body) = req.into_parts();
        let path = head
            .uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.to_string());
        let exchange = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    head.uri = path.parse().unwrap();
                    head.headers.insert(HOST, self.authority.parse().unwrap());
                    s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    s.send_request(Request::from_parts(head, body)).await
                }
                Sender::H2(s) => {
                    head.uri = format!("https://{}{path}", self.authority).parse().unwrap();
                    head.version = http::Version::HTTP_2;
                    s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    s.send_request(Request::from_parts(head, body)).await
                }
            }
            .map_err(|e| format!("request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((parts, body))
        };
        tokio::time::timeout(IO_LIMIT, exchange)
            .await
            .map_err(|_| format!("no response within {IO_LIMIT:?}"))?
    }

    /// True once the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hand-made ClientHellos

/// A TLS ClientHello record offering exactly `suites`, with `legacy_version` (0x0303 for
/// TLS 1.2, 0x0301 for TLS 1.0) and, when given, a `supported_versions` extension. It
/// carries SNI `localhost`, the groups x25519, P-256 and P-384, point format
/// uncompressed, the usual ECDSA, RSA and Ed25519 signature schemes, extended master
/// secret and an empty renegotiation_info: enough for a TLS 1.2 server to answer with a
/// ServerHello when it accepts one of the suites.
pub fn client_hello(
    legacy_version: u16,
    suites: &[u16],
    supported_versions: Option<&[u16]>,
) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend((data.len() as u16).to_be_bytes());
        out.extend(data);
    }
    fn u16s(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }
    let mut extensions = Vec::new();
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend(((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend((name.len() as u16).to_be_bytes());
    sni.extend(name);
    ext(&mut extensions, 0x0000, &sni);
    let groups = u16s(&[0x001d, 0x0017, 0x0018]);
    ext(
        &mut extensions,
        0x000a,
        &[&(groups.len() as u16).to_be_bytes()[..], &groups].concat(),
    );
    ext(&mut extensions, 0x000b, &[1, 0]);
    let schemes = u16s(&[0x0403, 0x0503, 0x0807, 0x0804, 0x0805, 0x0401, 0x0501]);
    ext(
        &mut extensions,
        0x000d,
        &[&(schemes.len() as u16).to_be_bytes()[..], &schemes].concat(),
    );
    ext(&mut extensions, 0x0017, &[]);
    ext(&mut extensions, 0xff01, &[0]);
    if let Some(versions) = supported_versions {
        let list = u16s(versions);
        ext(
            &mut extensions,
            0x002b,
            &[&[list.len() as u8][..], &list].concat(),
        );
    }

    let mut body = Vec::new();
    body.extend(legacy_version.to_be_bytes());
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
    body.push(0); // no session id
    let suites = u16s(suites);
    body.extend((suites.len() as u16).to_be_bytes());
    body.extend(suites);
    body.extend([1, 0]); // compression: null only
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);

    let mut handshake = vec![0x01];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);

    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// The server's first answer to bytes a test wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum RawReply {
    /// A fatal or warning alert with this description (40 handshake_failure,
    /// 70 protocol_version, 50 decode_error, ...).
    Alert(u8),
    /// A handshake record starting with a ServerHello.
    ServerHello,
    /// The connection was closed (or reset) without a record.
    Closed,
    /// Anything else: the first bytes.
    Other(Vec<u8>),
}

/// Connects to `addr`, writes `bytes` and reads the first TLS record that comes back.
pub async fn raw_reply(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let read = async {
        let mut head = [0u8; 5];
        if tcp.read_exact(&mut head).await.is_err() {
            return RawReply::Closed;
        }
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        let mut payload = vec![0u8; len];
        if tcp.read_exact(&mut payload).await.is_err() {
            return RawReply::Other(head.to_vec());
        }
        match (head[0], payload.as_slice()) {
            (0x15, [_level, description]) => RawReply::Alert(*description),
            (0x16, [0x02, ..]) => RawReply::ServerHello,
            _ => RawReply::Other([&head[..], &payload[..payload.len().min(16)]].concat()),
        }
    };
    tokio::time::timeout(IO_LIMIT, read)
        .await
        .expect("the server answers or closes within 5 s")
}

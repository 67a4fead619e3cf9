//! Connections to the target: HTTP/1.1, h2c (HTTP/2 with prior knowledge) and TLS with
//! ALPN; the request template; and failures sorted into kinds.

use std::{error::Error as StdError, fmt, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::{
    client::conn::{http1, http2},
    rt::{Read, Write},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{ClientConfig, RootCertStore, client::Resumption};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The response header that names the model version that answered.
pub const MODEL_DEPLOYMENT: HeaderName = HeaderName::from_static("azureml-model-deployment");

/// Where requests go and how connections are made.
pub struct Target {
    pub url: Uri,
    pub addr: SocketAddr,
    /// `host[:port]` for the Host header (HTTP/1.1) or `:authority` (h2).
    pub authority: HeaderValue,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub http2: bool,
}

/// TLS settings for `https://` targets.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions<'a> {
    /// PEM file of certificates to trust instead of the system's roots.
    pub ca_file: Option<&'a Path>,
    /// Name to verify the certificate against instead of the URL's host.
    pub server_name: Option<&'a str>,
    /// Allow session resumption (off: every handshake is a full one).
    pub resume: bool,
}

impl Target {
    /// Resolves the URL's host (preferring IPv4) and prepares TLS for `https://`.
    pub async fn new(url: Uri, http2: bool, tls: &TlsOptions<'_>) -> anyhow::Result<Target> {
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("URL must start with http:// or https://: {url}"),
        };
        let auth = url.authority().context("URL needs a host")?.clone();
        let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .with_context(|| format!("{host} resolved to no address"))?;
        let tls = if https {
            let name = tls.server_name.unwrap_or(host);
            let server_name = ServerName::try_from(name.to_string())
                .with_context(|| format!("'{name}' is not a valid TLS server name"))?;
            let config = tls_config(tls.ca_file, http2, tls.resume)?;
            Some((TlsConnector::from(Arc::new(config)), server_name))
        } else {
            if tls.ca_file.is_some() || tls.server_name.is_some() {
                bail!("TLS options need an https:// URL");
            }
            None
        };
        Ok(Target {
            authority: HeaderValue::from_str(auth.as_str()).context("URL authority")?,
            url,
            addr,
            tls,
            http2,
        })
    }

    pub fn protocol(&self) -> &'static str {
        match (self.tls.is_some(), self.http2) {
            (false, false) => "HTTP/1.1",
            (false, true) => "h2c",
            (true, false) => "HTTP/1.1 over TLS",
            (true, true) => "h2 over TLS",
        }
    }
}

/// A client config trusting `ca_file` (or the system's roots), offering `h2` or
/// `http/1.1` by ALPN.
pub fn tls_config(
    ca_file: Option<&Path>,
    http2: bool,
    resume: bool,
) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read CA file {}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("bad PEM in CA file {}", path.display()))?;
            if certs.is_empty() {
                bail!("CA file {} holds no certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("bad certificate in CA file {}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                bail!("no system root certificates found; pass --ca-file");
            }
        }
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Ok(config)
}

/// An open connection's request handle.
pub enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// A request that got no (complete) response, sorted by kind for the report.
#[derive(Debug)]
pub struct Failure {
    pub kind: &'static str,
    pub error: Box<dyn StdError + Send + Sync>,
}

impl Failure {
    pub fn new(kind: &'static str, error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Failure {
            kind,
            error: error.into(),
        }
    }

    /// Sorts an error from sending a request or reading its response.
    pub fn from_hyper(e: hyper::Error) -> Self {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
            "closed"
        } else if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
            "protocol"
        } else if e.is_body_write_aborted() || e.is_user() {
            "request"
        } else if source_is::<std::io::Error>(&e) {
            "io"
        } else {
            "http"
        };
        Failure::new(kind, e)
    }
}

fn source_is<T: StdError + 'static>(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = e.source();
    while let Some(s) = cur {
        if s.is::<T>() {
            return true;
        }
        cur = s.source();
    }
    false
}

impl fmt::Display for Failure {
    /// The error and its causes, "outer: inner: innermost".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut cur = self.error.source();
        let mut last = self.error.to_string();
        while let Some(s) = cur {
            let text = s.to_string();
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cur = s.source();
        }
        Ok(())
    }
}

/// Opens a connection: TCP (no Nagle), then TLS if the target has it (checking that
/// ALPN agreed on h2 when asked for), then the HTTP handshake. The connection task runs
/// on the current runtime.
pub async fn connect(target: &Target) -> Result<Conn, Failure> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| Failure::new("connect", e))?;
    let _ = tcp.set_nodelay(true);
    match &target.tls {
        None => handshake(TokioIo::new(tcp), target.http2).await,
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| Failure::new("tls", e))?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if target.http2 && alpn.as_deref() != Some(b"h2") {
                return Err(Failure::new(
                    "alpn",
                    format!(
                        "server did not agree to h2 by ALPN (selected {})",
                        alpn.map_or("nothing".to_string(), |p| String::from_utf8_lossy(&p)
                            .into_owned())
                    ),
                ));
            }
            handshake(TokioIo::new(tls), target.http2).await
        }
    }
}

async fn handshake<IO>(io: IO, http2: bool) -> Result<Conn, Failure>
where
    IO: Read + Write + Unpin + Send + 'static,
{
    if http2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| Failure::new("handshake", e))?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io)
            .await
            .map_err(|e| Failure::new("handshake", e))?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

/// The request every slot sends, built once.
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    /// HTTP/1.1 gets the origin-form path and a Host header (and `Connection: close` when
    /// `close`); h2 gets the absolute URI. A body without a Content-Type header is sent
    /// as `application/json`. Headers given here replace defaults of the same name.
    pub fn new(
        target: &Target,
        method: Method,
        extra: &[(HeaderName, HeaderValue)],
        body: Bytes,
        close: bool,
    ) -> Self {
        let mut headers = HeaderMap::new();
        let uri = if target.http2 {
            target.url.clone()
        } else {
            headers.insert(header::HOST, target.authority.clone());
            if close {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            target
                .url
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .expect("a URL's path is a valid URI")
        };
        if !body.is_empty() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let mut seen = Vec::new();
        for (name, value) in extra {
            if !seen.contains(name) {
                headers.remove(name);
                seen.push(name.clone());
            }
            headers.append(name.clone(), value.clone());
        }
        RequestTemplate {
            method,
            uri,
            headers,
            body,
        }
    }

    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Parses `Name: value`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("header '{s}' must be 'Name: value'"))?;
    let name =
        HeaderName::try_from(name.trim()).map_err(|_| format!("bad header name in '{s}'"))?;
    let value =
        HeaderValue::try_from(value.trim()).map_err(|_| format!("bad header value in '{s}'"))?;
    Ok((name, value))
}

/// GETs an `http://` URL on a fresh connection and returns the body as text.
pub async fn get_text(url: &Uri, timeout: Duration) -> anyhow::Result<String> {
    let fetch = async {
        if url.scheme_str() != Some("http") {
            bail!("only http:// URLs can be sampled");
        }
        let auth = url.authority().context("URL needs a host")?;
        let stream = TcpStream::connect((auth.host(), auth.port_u16().unwrap_or(80))).await?;
        let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, auth.as_str())
            .body(Full::new(Bytes::new()))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("{url} did not answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_reject() {
        let (n, v) = parse_header("Authorization: Bearer abc:def").unwrap();
        assert_eq!(n, header::AUTHORIZATION);
        assert_eq!(v, "Bearer abc:def");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[tokio::test]
    async fn templates_fit_the_protocol() {
        let url: Uri = "http://127.0.0.1:9/api/v1/endpoint/e/score?x=1"
            .parse()
            .unwrap();
        let h1 = Target::new(url.clone(), false, &TlsOptions::default())
            .await
            .unwrap();
        let extra = [
            parse_header("azureml-model-deployment: blue").unwrap(),
            parse_header("Content-Type: text/plain").unwrap(),
        ];
        let t = RequestTemplate::new(&h1, Method::POST, &extra, Bytes::from_static(b"{}"), true);
        let req = t.build();
        assert_eq!(req.uri(), "/api/v1/endpoint/e/score?x=1");
        assert_eq!(req.headers()[header::HOST], "127.0.0.1:9");
        assert_eq!(req.headers()[header::CONNECTION], "close");
        assert_eq!(req.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(req.headers()["azureml-model-deployment"], "blue");

        let h2 = Target::new(url.clone(), true, &TlsOptions::default())
            .await
            .unwrap();
        let req = RequestTemplate::new(&h2, Method::GET, &[], Bytes::new(), true).build();
        assert_eq!(req.uri(), &url);
        assert!(req.headers().is_empty());
        assert_eq!(h2.protocol(), "h2c");
    }

    #[tokio::test]
    async fn bad_targets_are_refused() {
        let opts = TlsOptions::default();
        assert!(
            Target::new("ftp://x/".parse().unwrap(), false, &opts)
                .await
                .is_err()
        );
        let with_ca = TlsOptions {
            ca_file: Some(Path::new("/nonexistent.pem")),
            ..TlsOptions::default()
        };
        let e = Target::new("http://127.0.0.1:1/".parse().unwrap(), false, &with_ca)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = Target::new("https://127.0.0.1:1/".parse().unwrap(), false, &with_ca)
            .await
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("cannot read CA file"), "{e:#}");
    }
}

//! TLS for the https listener: rustls with the ring provider, TLS 1.2 and 1.3 with the
//! provider's AEAD-only suites (ECDHE key exchange, AES-GCM and ChaCha20-Poly1305: the
//! Mozilla "intermediate" set), ALPN `h2` and `http/1.1`.
//!
//! The certificate is held by a [`CertStore`] that every handshake asks; the file watcher
//! swaps a new pair in once it loads and checks out, so new connections get it while
//! established ones carry on. A pair that fails to load is reported and never swapped in.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// A loaded, checked certificate chain and key.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The leaf's validity window, in seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl LoadedCert {
    /// Reads a PEM chain (leaf first) and a PEM key (PKCS#8, SEC1 or PKCS#1), and checks
    /// that the key belongs to the leaf and that the leaf is valid at `now`.
    pub fn load(cert_file: &Path, key_file: &Path, now: SystemTime) -> Result<LoadedCert, String> {
        let chain = CertificateDer::pem_file_iter(cert_file)
            .map_err(|e| format!("{}: cannot read certificates: {e}", cert_file.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not PEM certificates: {e}", cert_file.display()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{}: holds no certificate", cert_file.display()))?;
        let (not_before, not_after) = validity(leaf).ok_or_else(|| {
            format!(
                "{}: the first certificate is not a readable X.509 certificate",
                cert_file.display()
            )
        })?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("{}: no PEM private key: {e}", key_file.display()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("{}: unusable private key: {e}", key_file.display()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| {
            format!(
                "{}: the private key does not belong to the certificate in {}",
                key_file.display(),
                cert_file.display()
            )
        })?;
        let now = unix(now);
        if now > not_after {
            return Err(format!(
                "{}: the certificate expired {} ago",
                cert_file.display(),
                ago(now - not_after)
            ));
        }
        if now < not_before {
            return Err(format!(
                "{}: the certificate is not valid for another {}",
                cert_file.display(),
                ago(not_before - now)
            ));
        }
        Ok(LoadedCert {
            key: Arc::new(certified),
            not_before,
            not_after,
        })
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn ago(seconds: i64) -> String {
    let d = Duration::from_secs(seconds.unsigned_abs());
    if d.as_secs() >= 2 * 86_400 {
        format!("{} days", d.as_secs() / 86_400)
    } else {
        format!("{} s", d.as_secs())
    }
}

/// The certificate new handshakes get.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    pub fn new(cert: LoadedCert) -> Arc<CertStore> {
        Arc::new(CertStore {
            current: ArcSwap::new(cert.key),
        })
    }

    pub fn replace(&self, cert: LoadedCert) {
        self.current.store(cert.key);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls settings of the https listener.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The leaf's `notBefore` and `notAfter` (RFC 5280 4.1.2.5), as epoch seconds.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = der(cert, 0x30)?;
    let (_, mut tbs, _) = der(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs, 0xa0)?.2; // version
    }
    tbs = der(tbs, 0x02)?.2; // serialNumber
    tbs = der(tbs, 0x30)?.2; // signature
    tbs = der(tbs, 0x30)?.2; // issuer
    let (_, validity, _) = der(tbs, 0x30)?;
    let (tag, from, rest) = der_any(validity)?;
    let not_before = time(tag, from)?;
    let (tag, until, _) = der_any(rest)?;
    Some((not_before, time(tag, until)?))
}

/// Splits one DER element with tag `tag` off `input`: `(tag, contents, rest)`.
fn der(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    der_any(input).filter(|(t, _, _)| *t == tag)
}

fn der_any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b))
    };
    (input.len() >= len).then(|| (tag, &input[..len], &input[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) to epoch seconds.
fn time(tag: u8, value: &[u8]) -> Option<i64> {
    let digits = value.strip_suffix(b"Z")?;
    let num = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(&digits[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (num(&digits[..4])?, &digits[4..]),
        _ => return None,
    };
    let [month, day, hour, minute, second] =
        [0, 2, 4, 6, 8].map(|i| num(&rest[i..i + 2]).unwrap_or(-1));
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || hour < 0
        || minute < 0
        || second < 0
    {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after H. Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_time_forms() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(0x18, b"20261123023121Z"), Some(1_795_401_081));
        assert_eq!(time(0x18, b"20240229120000Z"), Some(1_709_208_000));
        for bad in [
            &b"2026112302312Z"[..],
            b"20261323023121Z",
            b"20261123023121",
        ] {
            assert_eq!(time(0x18, bad), None);
        }
    }
}

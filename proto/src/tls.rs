//! TLS settings for both ends (rustls through tonic), loaded from PEM files and checked before
//! any socket opens: a missing file, a file without a certificate or key, or an expired
//! certificate is an error that names the file. Certificates are read once at start; renew them
//! by restarting (the coordinator resumes from its checkpoint).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM files larger than this are not certificates or keys.
const MAX_PEM_BYTES: u64 = 1 << 20;
/// A certificate this close to expiry is worth a warning at start.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// A certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What was loaded, for the caller to log.
#[derive(Debug)]
pub struct Loaded<T> {
    pub config: T,
    /// When the leaf certificate of our own identity expires, if we have one.
    pub expires_in: Option<Duration>,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .len();
    if size > MAX_PEM_BYTES {
        return Err(format!(
            "{what} {} is {size} bytes: not a PEM certificate or key",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The certificates in a PEM file, at least one.
fn certificates(
    path: &Path,
    what: &str,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), String> {
    let pem = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no `BEGIN CERTIFICATE` block",
            path.display()
        ));
    }
    Ok((pem, certs))
}

/// Loads and checks a certificate chain and key; returns tonic's identity and the time left on
/// the leaf certificate.
fn identity(files: &IdentityFiles, now: SystemTime) -> Result<(Identity, Duration), String> {
    let (cert_pem, certs) = certificates(&files.cert, "certificate")?;
    let key_pem = read_pem(&files.key, "private key")?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "private key {}: no PEM private key found ({e})",
            files.key.display()
        )
    })?;
    let left = time_left(&certs[0], now)
        .map_err(|e| format!("certificate {}: {e}", files.cert.display()))?;
    Ok((Identity::from_pem(cert_pem, key_pem), left))
}

/// Time until `cert` expires; an error if it has.
fn time_left(cert: &CertificateDer<'_>, now: SystemTime) -> Result<Duration, String> {
    let not_after = der::not_after(cert).ok_or("cannot read its validity period")?;
    let expiry = UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    expiry.duration_since(now).map_err(|_| {
        format!(
            "expired {} days ago: issue a new one",
            now.duration_since(expiry).unwrap_or_default().as_secs() / 86_400
        )
    })
}

/// The coordinator's TLS: its identity and, for mutual TLS, the CA that signs worker
/// certificates (workers without one are then refused during the handshake).
pub fn server_config(
    identity_files: &IdentityFiles,
    client_ca: Option<&Path>,
) -> Result<Loaded<ServerTlsConfig>, String> {
    let (identity, left) = identity(identity_files, SystemTime::now())?;
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        let (pem, _) = certificates(ca, "client CA")?;
        config = config.client_ca_root(Certificate::from_pem(pem));
    }
    Ok(Loaded {
        config,
        expires_in: Some(left),
    })
}

/// A worker's TLS: the CA that signs the coordinator's certificate, the name to expect in it,
/// and the worker's own identity under mutual TLS.
pub fn client_config(
    ca: &Path,
    server_name: &str,
    identity_files: Option<&IdentityFiles>,
) -> Result<Loaded<ClientTlsConfig>, String> {
    let (pem, _) = certificates(ca, "CA certificate")?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(server_name);
    let mut expires_in = None;
    if let Some(files) = identity_files {
        let (identity, left) = identity(files, SystemTime::now())?;
        config = config.identity(identity);
        expires_in = Some(left);
    }
    Ok(Loaded { config, expires_in })
}

/// Just enough DER to find a certificate's `notAfter` (RFC 5280 §4.1): Certificate ::= SEQUENCE
/// { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity
/// SEQUENCE { notBefore, notAfter }, ... }, ... }. Certificates come from the operator's own
/// files, and rustls parses them fully again at the handshake; this only reads a date.
mod der {
    /// One TLV: (tag, contents, rest).
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| acc << 8 | b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;

    /// `notAfter` in seconds since the Unix epoch.
    pub fn not_after(cert: &[u8]) -> Option<i64> {
        let (SEQUENCE, cert, _) = element(cert)? else {
            return None;
        };
        let (SEQUENCE, tbs, _) = element(cert)? else {
            return None;
        };
        let (tag, _, mut rest) = element(tbs)?;
        if tag == VERSION {
            rest = element(rest)?.2; // serialNumber
        }
        let rest = element(rest)?.2; // signature algorithm
        let rest = element(rest)?.2; // issuer
        let (SEQUENCE, validity, _) = element(rest)? else {
            return None;
        };
        let (_, _, rest) = element(validity)?; // notBefore
        let (tag, time, _) = element(rest)?;
        let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
        let (year, rest) = match tag {
            UTC_TIME if text.len() == 12 => {
                let yy: i64 = text[..2].parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
            }
            GENERALIZED_TIME if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
            _ => return None,
        };
        let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
        let (month, day) = (field(0)?, field(2)?);
        let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
        Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 25), 20_782);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certified(not_after: (i32, u8, u8)) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&signing_key).unwrap();
        rcgen::CertifiedKey { cert, signing_key }
    }

    fn write(dir: &Path, c: &rcgen::CertifiedKey<rcgen::KeyPair>) -> IdentityFiles {
        let files = IdentityFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, c.cert.pem()).unwrap();
        std::fs::write(&files.key, c.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn reads_the_expiry_of_utc_and_generalized_times() {
        for (date, days) in [((2049, 12, 31), 29_219), ((2051, 1, 2), 29_586)] {
            let c = certified(date);
            assert_eq!(
                der::not_after(c.cert.der()),
                Some(days * 86_400),
                "{date:?}"
            );
        }
    }

    #[test]
    fn valid_identity_loads_and_expired_or_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), &certified((2099, 1, 1)));
        let loaded = server_config(&files, Some(&files.cert)).unwrap();
        assert!(loaded.expires_in.unwrap() > Duration::from_secs(3600 * 24 * 365));
        client_config(&files.cert, "localhost", Some(&files)).unwrap();

        let expired = write(dir.path(), &certified((2021, 1, 1)));
        let e = server_config(&expired, None).unwrap_err();
        assert!(e.contains("cert.pem") && e.contains("expired"), "{e}");

        let e = server_config(
            &IdentityFiles {
                cert: dir.path().join("nope.pem"),
                key: expired.key.clone(),
            },
            None,
        )
        .unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");

        // A key where the certificate should be.
        let swapped = IdentityFiles {
            cert: expired.key.clone(),
            key: expired.cert.clone(),
        };
        let e = server_config(&swapped, None).unwrap_err();
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
    }
}

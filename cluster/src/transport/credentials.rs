//! The per-job CA and the node certificates it signs (see the module docs of
//! [`crate::transport`] for how a job's processes obtain them).

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{debug, info, warn};

use super::MEMBER_SERVER_NAME;

/// Name of the CA folder inside the job folder.
const CA_DIR: &str = "ca";
/// CA certificate file inside the CA folder (PEM).
const CA_CERT_FILE: &str = "cert.pem";
/// CA private key file inside the CA folder (PKCS#8 PEM, mode 0600).
const CA_KEY_FILE: &str = "key.pem";
/// Prefix of every job CA's common name; the rest is derived from the CA's public key, so that
/// CAs of different jobs have different names (a foreign certificate is then reported as
/// `UnknownIssuer`) and a CA loaded from disk can be turned back into an rcgen issuer without
/// parsing its certificate.
const CA_COMMON_NAME_PREFIX: &str = "fusion-bench job CA";

/// What went wrong while creating or loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A file or folder could not be created, written or read.
    #[error("credentials file {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not hold what it should.
    #[error("credentials file {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key or certificate generation failed.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        /// The CA or the node certificate.
        what: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The job CA did not appear in time (another process was expected to create it).
    #[error(
        "job CA {path} did not appear within {waited:?}; is the job folder shared, and did the \
         creating process (rank 0) start?"
    )]
    Timeout {
        /// The CA certificate path waited for.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io { path: path.to_path_buf(), source }
}

/// Parameters of the job CA with key `key`. A function of the key only, so that
/// [`Issuer::new`] on a loaded key yields an issuer whose name matches the certificate on disk.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // An uncompressed P-256 point: 0x04, then x; 8 bytes of x name the CA.
    let id: String =
        key.public_key_raw().iter().skip(1).take(8).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME_PREFIX} {id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The job's certificate authority, loaded from (or just created in) `<job dir>/ca/`.
pub struct JobCredentials {
    ca_dir: PathBuf,
    ca_cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCredentials").field("ca_dir", &self.ca_dir).finish_non_exhaustive()
    }
}

impl JobCredentials {
    /// Loads the job CA from `<job_dir>/ca/`, creating it first if it does not exist.
    ///
    /// Safe to call from many processes (on one or several hosts sharing `job_dir`) and threads
    /// at once: each candidate CA is written into a private temporary folder and renamed to
    /// `ca/`; the rename succeeds for exactly one of them, and everyone loads that one.
    pub fn create_or_load(job_dir: &Path) -> Result<Self, CredentialsError> {
        let ca_dir = job_dir.join(CA_DIR);
        if ca_dir.join(CA_CERT_FILE).exists() {
            return Self::load(job_dir);
        }
        fs::create_dir_all(job_dir).map_err(io_err(job_dir))?;
        let tmp = job_dir.join(temp_name());
        let result = write_new_ca(&tmp).and_then(|()| match fs::rename(&tmp, &ca_dir) {
            Ok(()) => {
                info!(ca = %ca_dir.display(), "created the job CA");
                Ok(())
            }
            // Someone else's CA got there first (ENOTEMPTY / EEXIST): use theirs.
            Err(_) if ca_dir.join(CA_CERT_FILE).exists() => {
                debug!(ca = %ca_dir.display(), "another process created the job CA first");
                Ok(())
            }
            Err(e) => Err(io_err(&ca_dir)(e)),
        });
        if tmp.exists() {
            if let Err(e) = fs::remove_dir_all(&tmp) {
                warn!(path = %tmp.display(), error = %e, "could not remove a temporary CA folder");
            }
        }
        result?;
        Self::load(job_dir)
    }

    /// Loads the job CA from `<job_dir>/ca/`; fails if it is absent.
    pub fn load(job_dir: &Path) -> Result<Self, CredentialsError> {
        let ca_dir = job_dir.join(CA_DIR);
        let cert_path = ca_dir.join(CA_CERT_FILE);
        let key_path = ca_dir.join(CA_KEY_FILE);
        let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let ca_cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| {
            CredentialsError::Invalid { path: cert_path.clone(), reason: e.to_string() }
        })?;
        let meta = fs::metadata(&key_path).map_err(io_err(&key_path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(
                path = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the job CA key is readable by other users; anyone who can read it can join the job"
            );
        }
        let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
        let invalid_key =
            |reason: String| CredentialsError::Invalid { path: key_path.clone(), reason };
        let key_der =
            PrivatePkcs8KeyDer::from_pem_slice(&key_pem).map_err(|e| invalid_key(e.to_string()))?;
        let key = KeyPair::try_from(&key_der).map_err(|e| invalid_key(e.to_string()))?;
        // The certificate's SubjectPublicKeyInfo holds the raw public key: a cheap check that the
        // two files belong together (else every node certificate would fail verification).
        let public = key.public_key_raw();
        if !ca_cert.windows(public.len()).any(|w| w == public) {
            return Err(invalid_key(format!(
                "the key does not belong to the CA certificate {}",
                cert_path.display()
            )));
        }
        Ok(Self { ca_dir, ca_cert, issuer: Issuer::new(ca_params(&key), key) })
    }

    /// Waits until `<job_dir>/ca/` exists (created by another process), then loads it. Polls
    /// every 50 ms; fails with [`CredentialsError::Timeout`] after `timeout`.
    pub fn wait_and_load(job_dir: &Path, timeout: Duration) -> Result<Self, CredentialsError> {
        let cert_path = job_dir.join(CA_DIR).join(CA_CERT_FILE);
        let start = Instant::now();
        while !cert_path.exists() {
            if start.elapsed() >= timeout {
                return Err(CredentialsError::Timeout { path: cert_path, waited: start.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self::load(job_dir)
    }

    /// The folder holding the CA (`<job dir>/ca`).
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// The CA certificate (DER), the only trust root of the job.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// Signs a fresh key pair for one process. SANs: `node_name` (if it is a valid DNS name),
    /// the host name, `localhost`, [`MEMBER_SERVER_NAME`], 127.0.0.1, ::1, then `extra_names`
    /// (DNS names or IP addresses). Extended key usage: server and client authentication.
    pub fn issue_node(
        &self,
        node_name: &str,
        extra_names: &[String],
    ) -> Result<NodeCredentials, CredentialsError> {
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        };
        if is_dns_name(node_name) {
            add(node_name);
        }
        if let Some(host) = host_name() {
            add(&host);
        }
        for name in ["localhost", MEMBER_SERVER_NAME, "127.0.0.1", "::1"] {
            add(name);
        }
        for name in extra_names {
            if is_dns_name(name) || name.parse::<std::net::IpAddr>().is_ok() {
                add(name);
            } else {
                warn!(name, "not a DNS name or IP address; left out of the certificate");
            }
        }
        let generate = |source| CredentialsError::Generate { what: "node certificate", source };
        let mut params = CertificateParams::new(names).map_err(generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(NodeCredentials {
            node_name: node_name.to_string(),
            ca_cert: self.ca_cert.clone(),
            cert_chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// One process's credentials: its certificate (signed by the job CA), its private key, and the
/// job CA certificate it trusts. Held in memory only.
pub struct NodeCredentials {
    node_name: String,
    ca_cert: CertificateDer<'static>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        Self {
            node_name: self.node_name.clone(),
            ca_cert: self.ca_cert.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// The node name the certificate was issued for.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The job CA certificate this node trusts.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// The node's certificate chain (its own certificate).
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// A copy of the node's private key.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// A name for a private temporary CA folder, unique across processes, hosts and threads.
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!(
        ".ca-tmp-{}-{}-{}-{}",
        host_name().unwrap_or_default(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Generates a CA into the new folder `dir` (mode 0700): `cert.pem` (0644), `key.pem` (0600),
/// both synced to disk.
fn write_new_ca(dir: &Path) -> Result<(), CredentialsError> {
    fs::DirBuilder::new().mode(0o700).create(dir).map_err(io_err(dir))?;
    let generate = |source| CredentialsError::Generate { what: "job CA", source };
    let key = KeyPair::generate().map_err(generate)?;
    let cert = ca_params(&key).self_signed(&key).map_err(generate)?;
    write_file(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    // Sync the folder so the entries survive a crash before the rename.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CredentialsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(contents).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// The host name (Slurm's node name first), if known.
fn host_name() -> Option<String> {
    let from_env = ["SLURMD_NODENAME", "HOSTNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|h| !h.trim().is_empty());
    from_env
        .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| is_dns_name(h))
}

/// Whether `name` is usable as a DNS SAN (letters, digits, `-` and `.`, not an IP address).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63 && !label.starts_with('-'))
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

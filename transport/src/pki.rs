//! The cluster's certificates: one CA per cluster and one certificate per node, whose DNS SAN is
//! the node name. The operator keeps the CA key; a node gets its [`NodeIdentity`] (the CA
//! certificate, its own certificate and key), never the CA key.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::ServerName;

use crate::TransportError;

/// A node's certificate and key (PEM).
#[derive(Clone)]
pub struct NodeCert {
    /// The node name (the certificate's DNS SAN and common name).
    pub name: String,
    /// The certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// The node's private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A cluster CA and the certificates of its nodes (PEM).
#[derive(Clone)]
pub struct ClusterPki {
    /// The CA certificate: every node trusts exactly this.
    pub ca_cert_pem: String,
    /// The CA's private key: kept by the operator, never given to a node.
    pub ca_key_pem: String,
    /// One certificate per node, in the order given.
    pub nodes: Vec<NodeCert>,
    /// The cluster's name (in the CA's common name).
    cluster: String,
}

impl std::fmt::Debug for ClusterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPki")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// What one node needs to join its cluster: the CA certificate, its certificate and its key.
#[derive(Clone)]
pub struct NodeIdentity {
    /// This node's name (must equal its certificate's DNS SAN).
    pub name: String,
    /// The cluster CA certificate (PEM).
    pub ca_cert_pem: String,
    /// This node's certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// This node's private key (PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClusterPki {
    /// The identity of node `name`, or `None` if the PKI has no certificate for it.
    pub fn identity(&self, name: &str) -> Option<NodeIdentity> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| NodeIdentity {
                name: n.name.clone(),
                ca_cert_pem: self.ca_cert_pem.clone(),
                cert_pem: n.cert_pem.clone(),
                key_pem: n.key_pem.clone(),
            })
    }
}

/// Checks that `name` can be a node name: a DNS name (it is the certificate SAN and the TLS SNI).
pub(crate) fn check_node_name(name: &str) -> Result<(), TransportError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)));
    if ok {
        Ok(())
    } else {
        Err(TransportError::Config {
            message: format!(
                "node name {name:?} is not a DNS name (letters, digits, '-' and '.', at most 255 bytes)"
            ),
        })
    }
}

fn tls_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TransportError {
    let what = what.into();
    move |e| TransportError::Tls {
        what,
        message: e.to_string(),
    }
}

/// Makes a CA for `cluster` and one certificate per node (ECDSA P-256). Node names must be
/// distinct DNS names; each certificate has the name as its DNS SAN and may act as TLS server and
/// client.
pub fn generate_cluster_pki(cluster: &str, nodes: &[&str]) -> Result<ClusterPki, TransportError> {
    for (i, n) in nodes.iter().enumerate() {
        check_node_name(n)?;
        if nodes[..i].contains(n) {
            return Err(TransportError::Config {
                message: format!("node name {n:?} appears twice"),
            });
        }
    }
    let ca_key = KeyPair::generate().map_err(tls_err("cluster CA key"))?;
    let ca_params = ca_params(cluster);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(tls_err("cluster CA certificate"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let certs = nodes
        .iter()
        .map(|name| node_cert(name, &issuer, None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ClusterPki {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem,
        nodes: certs,
        cluster: cluster.to_string(),
    })
}

/// The CA certificate's parameters of cluster `cluster` (the same every time: a certificate
/// issued later chains to the CA made first).
fn ca_params(cluster: &str) -> CertificateParams {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("pipefuse cluster {cluster} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    ca_params
}

/// A new key and certificate for node `name` signed by `issuer`, valid until `not_after`
/// (rcgen's far-future default when `None`).
fn node_cert(
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    not_after: Option<(i32, u8, u8)>,
) -> Result<NodeCert, TransportError> {
    let what = format!("certificate of node {name}");
    let key = KeyPair::generate().map_err(tls_err(what.clone()))?;
    let mut params =
        CertificateParams::new(vec![name.to_string()]).map_err(tls_err(what.clone()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(y - 1, m, d);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let cert = params.signed_by(&key, issuer).map_err(tls_err(what))?;
    Ok(NodeCert {
        name: name.to_string(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl ClusterPki {
    /// A new key and certificate for node `name` from this cluster's CA (a node's certificate
    /// issued again, e.g. after its key leaked; the old one stays valid until the CA changes).
    pub fn issue(&self, name: &str) -> Result<NodeCert, TransportError> {
        self.issue_until(name, None)
    }

    /// Test hook: a certificate for `name` from this cluster's CA that expired in 2020.
    #[cfg(feature = "test-hooks")]
    pub fn issue_expired(&self, name: &str) -> Result<NodeCert, TransportError> {
        self.issue_until(name, Some((2020, 1, 1)))
    }

    fn issue_until(
        &self,
        name: &str,
        not_after: Option<(i32, u8, u8)>,
    ) -> Result<NodeCert, TransportError> {
        check_node_name(name)?;
        let key = KeyPair::from_pem(&self.ca_key_pem).map_err(tls_err("cluster CA key"))?;
        let issuer = Issuer::new(ca_params(&self.cluster), key);
        node_cert(name, &issuer, not_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_names_and_distinct() {
        assert!(generate_cluster_pki("c", &["a", "a"]).is_err());
        assert!(generate_cluster_pki("c", &["no spaces"]).is_err());
        assert!(generate_cluster_pki("c", &[""]).is_err());
        let pki = generate_cluster_pki("c", &["node-0", "node-1"]).unwrap();
        assert!(pki.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(pki.identity("node-1").unwrap().name, "node-1");
        assert!(pki.identity("node-2").is_none());
    }
}

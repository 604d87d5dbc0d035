//! rustls configurations for mutual TLS inside one cluster (ring provider, TLS 1.3 only), the
//! quinn transport tuning, and the binding of a client certificate to a node name.

use std::sync::Arc;

use quinn::congestion::CubicConfig;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::options::GSO_MAX_UDP_PAYLOAD;
use crate::{NodeIdentity, QuicOptions, TransportError};

/// ALPN of the pipefuse protocol (the wire version is checked by the hello, not here, so that a
/// version mismatch gets a message instead of a TLS alert).
const ALPN: &[u8] = b"pipefuse";

fn tls(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The server and client configurations of one node.
pub(crate) fn configs(
    id: &NodeIdentity,
    options: &QuicOptions,
    max_udp_payload: u16,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let ca = CertificateDer::from_pem_slice(id.ca_cert_pem.as_bytes())
        .map_err(|e| tls("cluster CA certificate PEM", e))?;
    let cert = CertificateDer::from_pem_slice(id.cert_pem.as_bytes())
        .map_err(|e| tls(&format!("certificate PEM of node {}", id.name), e))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| tls(&format!("key PEM of node {}", id.name), e))?;
    // Our own certificate must be valid for our name, or every peer would refuse us.
    check_cert_name(&cert, &id.name)
        .map_err(|m| tls(&format!("certificate of node {}", id.name), m))?;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| tls("cluster CA certificate", e))?;
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls("client certificate verifier", e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls("server TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.clone(), ca], key.clone_key())
        .map_err(|e| tls("server certificate", e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls("client TLS versions", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| tls("client certificate", e))?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(transport_config(options, max_udp_payload)?);
    let server = QuicServerConfig::try_from(server).map_err(|e| tls("QUIC server config", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport.clone());
    server.migration(false);
    let client = QuicClientConfig::try_from(client).map_err(|e| tls("QUIC client config", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport);
    Ok((server, client))
}

/// quinn's default initial congestion window (RFC 9002: 10 datagrams of 1200 bytes).
const INITIAL_WINDOW: u64 = 12_000;

/// Keep-alive, idle timeout, the windows tuned for multi-MiB frames (DEPENDENCIES.md §5), the
/// path-MTU bound and whether segmentation offload is safe with it.
fn transport_config(
    o: &QuicOptions,
    max_udp_payload: u16,
) -> Result<TransportConfig, TransportError> {
    let cfg = |m: String| TransportError::Config { message: m };
    let idle = IdleTimeout::try_from(o.idle_timeout)
        .map_err(|_| cfg(format!("idle_timeout {:?} is too long", o.idle_timeout)))?;
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(o.keep_alive))
        .stream_receive_window(VarInt::from_u32(o.stream_window))
        .receive_window(VarInt::from_u32(o.connection_window))
        .send_window(o.send_window)
        .max_concurrent_uni_streams(VarInt::from_u32(o.max_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(4));
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    t.enable_segmentation_offload(max_udp_payload <= GSO_MAX_UDP_PAYLOAD);
    // Path-MTU probes count against the congestion window. With 64 KiB probes the default
    // initial window (12 000 bytes) is full after one probe, and a connection closed in that
    // moment (a refused handshake) cannot send its CONNECTION_CLOSE: quinn does not exempt it,
    // and a closed connection no longer processes the acknowledgements that would free the
    // window, so the peer saw a stateless reset instead of the reason. Four datagrams of the
    // largest size leave room for the close.
    let mut cubic = CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW.max(4 * u64::from(max_udp_payload)));
    t.congestion_controller_factory(Arc::new(cubic));
    Ok(t)
}

/// Checks that `cert` carries `name` as a DNS SAN.
pub(crate) fn check_cert_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let server_name = ServerName::try_from(name).map_err(|e| format!("bad name {name:?}: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|e| format!("certificate is not valid for node name {name}: {e}"))
}

/// Checks that the peer of an established connection presented a certificate for `name` (the
/// chain itself was verified against the CA during the TLS handshake).
pub(crate) fn check_peer_name(conn: &quinn::Connection, name: &str) -> Result<(), String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "the peer presented an empty certificate chain".to_string())?;
    check_cert_name(leaf, name)
}

//! `pipefuse keygen`: the cluster's certificate authority and one certificate per node, written
//! where the topology's `tls.ca` and `nodes[i].cert` / `nodes[i].key` point. The CA key is written
//! beside the CA certificate (`<ca>.key`): keep it with the operator, not on the nodes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use topology::ClusterSpec;

/// Arguments of `pipefuse keygen`.
#[derive(Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Topology TOML file naming the certificate paths (`[tls] ca`, per node `cert` and `key`).
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,
    /// Overwrite existing certificate and key files.
    #[arg(long)]
    force: bool,
}

fn write(path: &Path, text: &str, secret: bool, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!("{} exists; pass --force to replace it", path.display());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

pub(crate) fn run(a: KeygenArgs) -> Result<()> {
    let spec = ClusterSpec::from_file(&a.topology)?;
    let ca = spec.tls_ca.clone().ok_or_else(|| {
        spec.error(
            "tls.ca",
            "no CA certificate path",
            Some("add `[tls]` with `ca = \"certs/ca.pem\"`".into()),
        )
    })?;
    let mut targets = Vec::new();
    for (i, n) in spec.nodes.iter().enumerate() {
        let tls = n.tls.clone().ok_or_else(|| {
            spec.error(
                &format!("nodes[{i}].cert"),
                format!("node `{}` names no certificate", n.name),
                Some(format!(
                    "add `cert = \"certs/{0}.pem\"` and `key = \"certs/{0}.key\"`",
                    n.name
                )),
            )
        })?;
        targets.push((n.name.clone(), tls));
    }
    let cluster = a
        .topology
        .file_stem()
        .map_or("pipefuse".into(), |s| s.to_string_lossy().into_owned());
    let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    let pki = transport::generate_cluster_pki(&cluster, &names)?;
    // Check every target first, so a refusal leaves nothing half-written.
    let ca_key = ca.with_extension("key");
    if !a.force {
        for p in [&ca, &ca_key]
            .into_iter()
            .chain(targets.iter().flat_map(|(_, t)| [&t.cert, &t.key]))
        {
            if p.exists() {
                bail!("{} exists; pass --force to replace it", p.display());
            }
        }
    }
    write(&ca, &pki.ca_cert_pem, false, a.force)?;
    write(&ca_key, &pki.ca_key_pem, true, a.force)?;
    for (cert, (name, tls)) in pki.nodes.iter().zip(&targets) {
        debug_assert_eq!(&cert.name, name);
        write(&tls.cert, &cert.cert_pem, false, a.force)?;
        write(&tls.key, &cert.key_pem, true, a.force)?;
        eprintln!(
            "node {name}: {} + {}",
            tls.cert.display(),
            tls.key.display()
        );
    }
    eprintln!(
        "cluster CA `{cluster}`: {} (key {}: keep it off the nodes)",
        ca.display(),
        ca_key.display()
    );
    Ok(())
}

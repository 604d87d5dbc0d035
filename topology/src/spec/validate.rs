//! Semantic checks of a [`ClusterSpec`], run after parsing and again by
//! [`ClusterSpec::validate`]; each error points at the field's line when it came from a file.

use super::{ClusterSpec, DeviceSpec, ModelSpec, Precision};
use crate::error::Result;

pub(super) fn validate(s: &ClusterSpec) -> Result<()> {
    model(s)?;
    nodes(s)?;
    tls_files(s)?;
    coordinator(s)?;
    parallel(s)
}

fn model(s: &ClusterSpec) -> Result<()> {
    match &s.model {
        ModelSpec::Path(p) if p.as_os_str().is_empty() => Err(s.error(
            "model.path",
            "the model path is empty",
            Some("set `path` to a diffusers folder, relative to the topology file".into()),
        )),
        ModelSpec::Preset { name, .. } if name.trim().is_empty() => Err(s.error(
            "model.preset",
            "the preset name is empty",
            Some("name a preset such as \"DiT-B/2\"".into()),
        )),
        _ => Ok(()),
    }
}

fn nodes(s: &ClusterSpec) -> Result<()> {
    if s.nodes.is_empty() {
        return Err(s.error(
            "nodes",
            "the topology has no nodes",
            Some("add a [[nodes]] table with `name` and `devices`".into()),
        ));
    }
    // First index of each name and address (hash maps: a topology of 100,000 nodes is checked in
    // linear time).
    let mut names: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut addresses: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, node) in s.nodes.iter().enumerate() {
        let path = format!("nodes[{i}]");
        if node.name.trim().is_empty() {
            return Err(s.error(
                &format!("{path}.name"),
                "the node name is empty",
                Some("give every node a unique, non-empty name".into()),
            ));
        }
        if let Some(j) = names.insert(&node.name, i) {
            return Err(s.error(
                &format!("{path}.name"),
                format!("node name `{}` is already used by nodes[{j}]", node.name),
                Some("node names must be unique".into()),
            ));
        }
        if let Some(address) = &node.address {
            if let Err(why) = check_address(address) {
                return Err(s.error(
                    &format!("{path}.address"),
                    format!("address `{address}`: {why}"),
                    Some("write \"host:port\", e.g. \"10.0.0.2:7000\" or \"[::1]:7000\"".into()),
                ));
            }
            if let Some(j) = addresses.insert(address, i) {
                return Err(s.error(
                    &format!("{path}.address"),
                    format!("address `{address}` is already used by nodes[{j}]"),
                    Some("every node listens on its own host:port".into()),
                ));
            }
        }
        if node.devices.is_empty() {
            return Err(s.error(
                &format!("{path}.devices"),
                format!("node `{}` has no devices", node.name),
                Some("add e.g. `devices = [ { kind = \"cpu\", threads = 1 } ]`".into()),
            ));
        }
        for (k, device) in node.devices.iter().enumerate() {
            match *device {
                DeviceSpec::Cpu { threads: 0, .. } => {
                    return Err(s.error(
                        &format!("{path}.devices[{k}].threads"),
                        "a cpu device needs threads >= 1",
                        Some("set `threads = 1` or more (or leave it out for 1)".into()),
                    ))
                }
                DeviceSpec::Cpu {
                    precision: Precision::F16,
                    ..
                } => {
                    return Err(s.error(
                        &format!("{path}.devices[{k}].dtype"),
                        "f16 is for cuda devices: a cpu device computes in f32 or bf16",
                        Some("use bf16 (or f32) for cpu devices".into()),
                    ))
                }
                DeviceSpec::Cuda { ordinal, .. } => {
                    let earlier = node.devices[..k]
                        .iter()
                        .any(|d| matches!(d, DeviceSpec::Cuda { ordinal: o, .. } if *o == ordinal));
                    if earlier {
                        return Err(s.error(
                            &format!("{path}.devices[{k}].ordinal"),
                            format!("cuda:{ordinal} is listed twice on node `{}`", node.name),
                            Some("each GPU of a node appears once".into()),
                        ));
                    }
                }
                DeviceSpec::Cpu { threads, .. } if threads > DeviceSpec::MAX_CPU_THREADS => {
                    return Err(s.error(
                        &format!("{path}.devices[{k}].threads"),
                        format!(
                            "threads = {threads}: a cpu device has at most {} threads",
                            DeviceSpec::MAX_CPU_THREADS
                        ),
                        Some(
                            "use about one thread per core of the node, split over its devices"
                                .into(),
                        ),
                    ))
                }
                DeviceSpec::Cpu { .. } => {}
            }
        }
    }
    Ok(())
}

/// Every certificate and key is its own file: the CA (and the CA key `pipefuse keygen` writes
/// beside it, `<ca>.key`) and each node's pair. Two nodes naming one file would each need the
/// other's certificate (a certificate names one node), and `keygen` would overwrite one with the
/// other.
fn tls_files(s: &ClusterSpec) -> Result<()> {
    let mut seen: std::collections::HashMap<&std::path::Path, String> =
        std::collections::HashMap::new();
    let ca_key = s.tls_ca.as_ref().map(|ca| ca.with_extension("key"));
    if let (Some(ca), Some(ca_key)) = (&s.tls_ca, &ca_key) {
        seen.insert(ca, "tls.ca".into());
        seen.insert(
            ca_key,
            "tls.ca's key (the CA path with extension .key)".into(),
        );
    }
    for (i, node) in s.nodes.iter().enumerate() {
        let Some(tls) = &node.tls else { continue };
        for (field, file) in [("cert", &tls.cert), ("key", &tls.key)] {
            let here = format!("nodes[{i}].{field}");
            if let Some(other) = seen.insert(file, here.clone()) {
                return Err(s.error(
                    &here,
                    format!(
                        "{} is also {other}: every node's certificate and key is its own file",
                        file.display()
                    ),
                    Some(format!(
                        "e.g. `cert = \"certs/{0}.pem\"`, `key = \"certs/{0}.key\"`",
                        node.name
                    )),
                ));
            }
        }
    }
    Ok(())
}

/// `host:port` with a non-empty host and a port in 1..=65535.
fn check_address(address: &str) -> std::result::Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.chars().any(char::is_whitespace) {
        return Err("the host contains whitespace".into());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 host goes in brackets".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p >= 1 => Ok(()),
        _ => Err(format!("`{port}` is not a port (1..=65535)")),
    }
}

fn coordinator(s: &ClusterSpec) -> Result<()> {
    if s.nodes.iter().any(|n| n.name == s.coordinator) {
        return Ok(());
    }
    let names: Vec<&str> = s.nodes.iter().map(|n| n.name.as_str()).collect();
    Err(s.error(
        "coordinator",
        format!("`{}` is not the name of a node", s.coordinator),
        Some(format!("name one of the nodes: {}", names.join(", "))),
    ))
}

fn parallel(s: &ClusterSpec) -> Result<()> {
    let p = &s.parallel;
    for (field, value) in [
        ("parallel.cfg_degree", p.cfg_degree),
        ("parallel.ulysses_degree", p.ulysses_degree),
        ("parallel.ring_degree", p.ring_degree),
    ] {
        if value == 0 {
            return Err(s.error(field, "must be >= 1", Some("use 1 to turn it off".into())));
        }
    }
    if p.cfg_degree > 2 {
        return Err(s.error(
            "parallel.cfg_degree",
            format!("must be 1 or 2, found {}", p.cfg_degree),
            Some("CFG has two branches (conditional, unconditional): 2 splits them".into()),
        ));
    }
    // A defaulted pipefusion_degree (devices / others) is reported by the product check below.
    let explicit = s.lines.contains_key("parallel.pipefusion_degree") || s.lines.is_empty();
    if explicit && p.pipefusion_degree == 0 {
        return Err(s.error(
            "parallel.pipefusion_degree",
            "must be >= 1",
            Some("use 1 for no pipeline".into()),
        ));
    }
    let count = s.device_count();
    let product = [
        p.pipefusion_degree,
        p.cfg_degree,
        p.ulysses_degree,
        p.ring_degree,
    ]
    .iter()
    .fold(1usize, |a, b| a.saturating_mul(*b));
    if product != count {
        let others = p.cfg_degree * p.ulysses_degree * p.ring_degree;
        let fix = if count % others == 0 {
            format!(
                "set pipefusion_degree = {} (devices / (cfg * ulysses * ring)), or change the devices",
                count / others
            )
        } else {
            format!(
                "the device count {count} must be a multiple of cfg * ulysses * ring = {others}: \
                 change the degrees or the devices"
            )
        };
        let default = if explicit {
            ""
        } else {
            " (pipefusion_degree defaulted)"
        };
        return Err(s.error(
            "parallel.pipefusion_degree",
            format!(
                "pipefusion_degree * cfg_degree * ulysses_degree * ring_degree = \
                 {} * {} * {} * {} = {product}{default}, but the nodes have {count} devices",
                p.pipefusion_degree, p.cfg_degree, p.ulysses_degree, p.ring_degree
            ),
            Some(fix),
        ));
    }
    if p.num_patches == 0 {
        return Err(s.error(
            "parallel.num_patches",
            "must be >= 1",
            Some(format!(
                "use num_patches >= pipefusion_degree = {}",
                p.pipefusion_degree
            )),
        ));
    }
    if let Some(split) = &p.layer_split {
        if split.len() != p.pipefusion_degree {
            return Err(s.error(
                "parallel.layer_split",
                format!(
                    "has {} entries but pipefusion_degree is {}",
                    split.len(),
                    p.pipefusion_degree
                ),
                Some("give one layer count per pipeline stage, or remove layer_split for an even split".into()),
            ));
        }
        if let Some(i) = split.iter().position(|&n| n == 0) {
            return Err(s.error(
                &format!("parallel.layer_split[{i}]"),
                format!("stage {i} gets 0 layers"),
                Some("every stage needs at least 1 layer".into()),
            ));
        }
    }
    Ok(())
}

//! The handshake hello: a fixed little-endian layout (not rkyv), so that any two versions can
//! read each other's version number and refuse cleanly.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Leading bytes of a hello; anything else on the first stream is not a pipefuse node.
const HELLO_MAGIC: &[u8; 8] = b"PIPEFUSE";
/// Fixed part of a hello: magic, version, fingerprint, name length.
const HELLO_FIXED: usize = 8 + 4 + 32 + 1;

/// The handshake message (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) fingerprint: [u8; 32],
    pub(crate) name: String,
}

impl Hello {
    /// `magic | version u32 LE | fingerprint [32] | name length u8 | name`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut out = Vec::with_capacity(HELLO_FIXED + name.len());
        out.extend_from_slice(HELLO_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.push(name.len() as u8); // node names are checked to be at most 255 bytes
        out.extend_from_slice(name);
        out
    }

    /// Reads a hello; an I/O error is returned as is, bad bytes as `Err(Ok(message))`.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Hello, Result<String, std::io::Error>> {
        let mut fixed = [0u8; HELLO_FIXED];
        r.read_exact(&mut fixed).await.map_err(Err)?;
        if &fixed[..8] != HELLO_MAGIC {
            return Err(Ok(
                "the peer is not a pipefuse node (bad hello magic)".into()
            ));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        let fingerprint: [u8; 32] = fixed[12..44].try_into().expect("32 bytes");
        let mut name = vec![0u8; fixed[44] as usize];
        r.read_exact(&mut name).await.map_err(Err)?;
        let name = String::from_utf8(name)
            .map_err(|_| Ok("the peer's node name is not UTF-8".to_string()))?;
        Ok(Hello {
            version,
            fingerprint,
            name,
        })
    }
}

/// Short hex of a fingerprint for messages (first 8 bytes).
pub(crate) fn short_hex(fp: &[u8; 32]) -> String {
    fp[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hello_round_trips_and_rejects_other_bytes() {
        let h = Hello {
            version: 7,
            fingerprint: [3; 32],
            name: "node-a".into(),
        };
        let b = h.encode();
        assert_eq!(Hello::read(&mut &b[..]).await.unwrap(), h);
        let mut other = b.clone();
        other[0] = b'X';
        assert!(matches!(Hello::read(&mut &other[..]).await, Err(Ok(_))));
    }
}

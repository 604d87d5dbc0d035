//! Throughput of the QUIC transport (two [`QuicNode`]s with the real mutual-TLS configuration on
//! loopback) against a plain tokio `TcpStream` carrying the same framing, in one process. For
//! `pipefuse bench transport`; numbers on a shared machine are noisy, so compare the two columns
//! of one run rather than runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::quic::{encode_header, read_frame, ReadFail};
use crate::{
    generate_cluster_pki, ClusterMap, Frame, FrameHeader, FrameLabel, Link, NodeAddr, QuicNode,
    QuicOptions, TransportError, WireDType,
};

/// One payload size's results.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// Payload bytes per message.
    pub size: usize,
    /// Messages per measurement.
    pub count: usize,
    /// QUIC: payload MB/s (10^6 bytes) of `count` messages sent back to back.
    pub quic_mb_s: f64,
    /// TCP: the same.
    pub tcp_mb_s: f64,
    /// QUIC: median time from send to arrival of one message sent alone.
    pub quic_p50: Duration,
    /// TCP: the same.
    pub tcp_p50: Duration,
}

/// The results of [`bench_quic_vs_tcp`], one row per size.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BenchReport {
    /// In the order of the sizes asked for.
    pub rows: Vec<BenchRow>,
    /// The sender's QUIC path MTU at the end (bytes of UDP payload).
    pub quic_path_mtu: u16,
    /// Packets the sender declared lost over the whole run.
    pub quic_lost_packets: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>12} {:>6} {:>11} {:>11} {:>13} {:>13}",
            "payload", "count", "QUIC MB/s", "TCP MB/s", "QUIC p50 ms", "TCP p50 ms"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:>12} {:>6} {:>11.0} {:>11.0} {:>13.3} {:>13.3}",
                r.size,
                r.count,
                r.quic_mb_s,
                r.tcp_mb_s,
                r.quic_p50.as_secs_f64() * 1e3,
                r.tcp_p50.as_secs_f64() * 1e3
            )?;
        }
        writeln!(
            f,
            "QUIC path MTU {} bytes, {} packets lost",
            self.quic_path_mtu, self.quic_lost_packets
        )
    }
}

fn frame(size: usize) -> Frame {
    let n = (size / 4).max(1);
    Frame {
        header: FrameHeader {
            request: 0,
            from: 0,
            label: FrameLabel::Hidden { step: 0, part: 0 },
            dtype: WireDType::F32,
            shape: vec![n as u32],
        },
        payload: (0..n * 4).map(|i| i as u8).collect(),
    }
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn mb_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6
}

/// A sender and a receiver of frames, QUIC or TCP.
trait Pipe {
    async fn send(&mut self, f: Frame) -> Result<(), TransportError>;
    async fn recv(&mut self) -> Option<Frame>;
}

struct QuicPipe {
    link: std::sync::Arc<dyn Link>,
    inbox: UnboundedReceiver<Frame>,
}

impl Pipe for QuicPipe {
    async fn send(&mut self, f: Frame) -> Result<(), TransportError> {
        self.link.send_async(f).await
    }
    async fn recv(&mut self) -> Option<Frame> {
        self.inbox.recv().await
    }
}

struct TcpPipe {
    addr: SocketAddr,
    stream: TcpStream,
    inbox: UnboundedReceiver<Frame>,
}

impl Pipe for TcpPipe {
    async fn send(&mut self, f: Frame) -> Result<(), TransportError> {
        let header = encode_header(&f, 1)
            .map_err(|message| TransportError::Malformed { from: 0, message })?;
        let io = |source| TransportError::Io {
            op: "write TCP",
            addr: self.addr,
            source,
        };
        self.stream.write_all(&header).await.map_err(io)?;
        self.stream.write_all(&f.payload).await.map_err(io)
    }
    async fn recv(&mut self) -> Option<Frame> {
        self.inbox.recv().await
    }
}

/// Back-to-back throughput (MB/s) and the median single-message latency.
async fn measure(
    p: &mut impl Pipe,
    size: usize,
    count: usize,
) -> Result<(f64, Duration), TransportError> {
    let template = frame(size);
    let size = template.payload.len();
    for _ in 0..2 {
        p.send(template.clone()).await?;
        p.recv().await;
    }
    let frames: Vec<Frame> = (0..count).map(|_| template.clone()).collect();
    // Inboxes are unbounded, so sending everything first never deadlocks; the clock stops when
    // the last frame has arrived.
    let t0 = Instant::now();
    for f in frames {
        p.send(f).await?;
    }
    for _ in 0..count {
        p.recv().await;
    }
    let rate = mb_s(size * count, t0.elapsed());
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        let f = template.clone();
        let t = Instant::now();
        p.send(f).await?;
        p.recv().await;
        lat.push(t.elapsed());
    }
    Ok((rate, p50(lat)))
}

async fn quic_pipe(options: QuicOptions) -> Result<(QuicPipe, QuicNode, QuicNode), TransportError> {
    let pki = generate_cluster_pki("bench", &["bench-a", "bench-b"])?;
    let local: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let id = |n: &str| pki.identity(n).expect("generated");
    let a = QuicNode::bind(id("bench-a"), local, options.clone())?;
    let b = QuicNode::bind(id("bench-b"), local, options)?;
    let map = ClusterMap {
        fingerprint: [0; 32],
        nodes: vec![
            NodeAddr {
                name: "bench-a".into(),
                addr: a.local_addr(),
                devices: vec![0],
            },
            NodeAddr {
                name: "bench-b".into(),
                addr: b.local_addr(),
                devices: vec![1],
            },
        ],
    };
    let (ea, eb) = tokio::join!(a.join(&map), b.join(&map));
    let (mut ea, mut eb) = (ea?, eb?);
    let link = ea.remove(0).links[1].clone();
    let inbox = eb.remove(0).inbox;
    Ok((QuicPipe { link, inbox }, a, b))
}

async fn tcp_pipe() -> Result<TcpPipe, TransportError> {
    let local: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let io = |op, addr| move |source| TransportError::Io { op, addr, source };
    let listener = TcpListener::bind(local)
        .await
        .map_err(io("bind TCP", local))?;
    let addr = listener.local_addr().map_err(io("bind TCP", local))?;
    let (stream, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let stream = stream.map_err(io("connect TCP", addr))?;
    let (mut rx, _) = accepted.map_err(io("accept TCP", addr))?;
    stream
        .set_nodelay(true)
        .map_err(io("set TCP_NODELAY", addr))?;
    let (tx, inbox) = unbounded_channel();
    tokio::spawn(async move {
        let mut hdr = AlignedVec::new();
        loop {
            match read_frame(&mut rx, &mut hdr, usize::MAX).await {
                Ok(Some(d)) => {
                    if tx.send(d.frame).is_err() {
                        return;
                    }
                }
                Ok(None) | Err(ReadFail::Closed(_)) => return,
                Err(ReadFail::Malformed(m)) => {
                    tracing::error!(message = %m, "TCP bench: malformed frame");
                    return;
                }
            }
        }
    });
    Ok(TcpPipe {
        addr,
        stream,
        inbox,
    })
}

/// For each payload size, sends `count` frames back to back and then `count` frames one at a
/// time, over QUIC (mutual TLS, `options`; `QuicOptions::default()` is what nodes use) and over
/// TCP with the same framing, and reports MB/s and the median per-message latency.
pub async fn bench_quic_vs_tcp(
    sizes: &[usize],
    count: usize,
    options: QuicOptions,
) -> Result<BenchReport, TransportError> {
    let (mut quic, a, _b) = quic_pipe(options).await?;
    let mut tcp = tcp_pipe().await?;
    let mut rows = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let (quic_mb_s, quic_p50) = measure(&mut quic, size, count).await?;
        let (tcp_mb_s, tcp_p50) = measure(&mut tcp, size, count).await?;
        rows.push(BenchRow {
            size,
            count,
            quic_mb_s,
            tcp_mb_s,
            quic_p50,
            tcp_p50,
        });
    }
    let stats = a.peer_stats("bench-b");
    Ok(BenchReport {
        rows,
        quic_path_mtu: stats.as_ref().map_or(0, |s| s.path_mtu),
        quic_lost_packets: stats.as_ref().map_or(0, |s| s.lost_packets),
    })
}

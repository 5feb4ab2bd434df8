//! The cache over real NBD sockets on loopback: the source exports its cache to the
//! destination, the origin is itself an NBD export.

use std::net::SocketAddr;
use std::sync::Arc;

use cache::{
    prepare_destination, BlockCache, BlockIdx, BlockSize, BlockSource, CacheConfig,
    OriginNbdSource, PeerExport, PeerNbdSource, Rebuild, Strategy,
};
use nbd::{NbdAddr, ReconnectPolicy, ServeConfig};

use crate::{image, open, origin, BS};

const BSU: u64 = BS as u64;

fn loopback() -> NbdAddr {
    NbdAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[test]
fn destination_rebuilds_from_the_source_cache_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    let (src, _) = open(dir.path(), "src", 32, &o);
    let mut buf = vec![0u8; 512];
    for b in 0..20 {
        src.read(&mut buf, b * BSU).unwrap();
    }
    let snap = src.migration_snapshot();
    let server =
        nbd::serve(ServeConfig::new(loopback()).export("peer", Arc::new(PeerExport(src.clone()))))
            .unwrap();
    let bs = BlockSize::new(BS).unwrap();
    let peer = PeerNbdSource::connect(
        server.local_addr(),
        "peer",
        ReconnectPolicy::default(),
        snap.block_set(),
        bs,
    )
    .unwrap();

    // A block the source does not hold: "not here", not an error and not an origin read.
    let mut blk = vec![0u8; BS as usize];
    assert!(peer.read_block(BlockIdx(40), &mut blk).unwrap().is_none());
    assert_eq!(
        src.stats().bytes_from_origin,
        20 * BSU,
        "the peer view must not fill"
    );

    let (dst, _) = open(dir.path(), "dst", 32, &o);
    let plan = prepare_destination(&dst, &snap, Arc::new(peer), Strategy::HeatPattern);
    let p = Rebuild::start(dst.clone(), plan).join();
    assert_eq!((p.installed, p.bytes_from_origin), (20, 0), "{p:?}");
    let img = image(dir.path());
    for b in 0..20u64 {
        dst.read(&mut blk, b * BSU).unwrap();
        assert_eq!(blk, img[(b * BSU) as usize..][..BS as usize]);
    }
    assert_eq!(dst.stats().misses, 0);
}

#[test]
fn the_origin_can_be_an_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let _ = origin(dir.path(), 16);
    let dev = nbd::FileDevice::open(dir.path().join("disk.img"), false).unwrap();
    let server = nbd::serve(ServeConfig::new(loopback()).export("", Arc::new(dev))).unwrap();
    let bs = BlockSize::new(BS).unwrap();
    let o =
        OriginNbdSource::connect(server.local_addr(), "", ReconnectPolicy::default(), bs).unwrap();
    let mut cfg = CacheConfig::new(dir.path().join("c"), 8);
    cfg.block_size = bs;
    let (c, _) = BlockCache::open(cfg, Arc::new(o)).unwrap();
    c.write(&[3u8; 10], 5 * BSU + 1, true).unwrap();
    let mut buf = vec![0u8; 3 * BS as usize];
    c.read(&mut buf, 4 * BSU).unwrap();
    assert_eq!(buf, image(dir.path())[4 * BS as usize..7 * BS as usize]);
    assert_eq!(&buf[BS as usize + 1..BS as usize + 11], &[3u8; 10]);
}

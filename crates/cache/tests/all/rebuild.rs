use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use cache::{
    prepare_destination, BlockIdx, BlockSource, CacheSource, Generation, Rebuild, SourceError,
    Strategy,
};

use crate::{image, open, origin, BS};

const BSU: u64 = BS as u64;

#[test]
fn destination_rebuilds_from_the_peer_without_touching_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 128);
    let (src, _) = open(dir.path(), "src", 64, &o);
    let mut buf = vec![0u8; 1024];
    for round in 0..3u64 {
        for b in 0..40 {
            src.read(&mut buf, ((b * 7 + round) % 48) * BSU).unwrap();
        }
    }
    let snap = src.migration_snapshot();
    let (dst, _) = open(dir.path(), "dst", 64, &o);
    let plan = prepare_destination(
        &dst,
        &snap,
        Arc::new(CacheSource::new(src.clone())),
        Strategy::HeatPattern,
    );
    assert_eq!(plan.blocks.len(), snap.blocks.len());
    let progress = Rebuild::start(dst.clone(), plan).join();
    assert_eq!(progress.left(), 0);
    assert_eq!(progress.installed, snap.blocks.len() as u64, "{progress:?}");
    assert_eq!(progress.bytes_from_origin, 0);
    assert_eq!(progress.bytes_from_peer, snap.blocks.len() as u64 * BSU);
    // Every block the source had is now a hit on the destination, with the right bytes.
    let img = image(dir.path());
    let mut blk = vec![0u8; BS as usize];
    for (b, _) in &snap.blocks {
        dst.read(&mut blk, b * BSU).unwrap();
        assert_eq!(blk, img[(b * BSU) as usize..][..BS as usize]);
    }
    assert_eq!(dst.stats().misses, 0);
}

#[test]
fn demand_misses_fall_back_to_the_origin_for_blocks_the_peer_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 32);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; 512];
    src.read(&mut buf, 0).unwrap();
    let snap = src.migration_snapshot();
    let (dst, _) = open(dir.path(), "dst", 8, &o);
    let _ = prepare_destination(
        &dst,
        &snap,
        Arc::new(CacheSource::new(src.clone())),
        Strategy::Redirect,
    );
    dst.read(&mut buf, 0).unwrap();
    dst.read(&mut buf, 5 * BSU).unwrap();
    let s = dst.stats();
    assert_eq!((s.bytes_from_peer, s.bytes_from_origin), (BSU, BSU));
}

#[test]
fn a_block_written_on_the_destination_is_never_read_back_from_the_older_peer() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    src.read(&mut buf, 2 * BSU).unwrap();
    let snap = src.migration_snapshot();
    let (dst, _) = open(dir.path(), "dst", 8, &o);
    let _ = prepare_destination(
        &dst,
        &snap,
        Arc::new(CacheSource::new(src.clone())),
        Strategy::Redirect,
    );
    // Partial write to a block the destination does not cache: write-around to the origin.
    dst.write(&[0xeeu8; 100], 2 * BSU + 5, false).unwrap();
    assert!(!dst.contains(BlockIdx(2)));
    dst.read(&mut buf, 2 * BSU).unwrap();
    assert_eq!(&buf[5..105], &[0xeeu8; 100][..]);
    assert_eq!(buf, image(dir.path())[2 * BS as usize..3 * BS as usize]);
}

/// A peer whose reads stop in the middle until the test lets them go.
#[derive(Debug)]
struct GatedPeer {
    inner: CacheSource,
    started: Mutex<mpsc::Sender<()>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl BlockSource for GatedPeer {
    fn name(&self) -> &str {
        "gated peer"
    }
    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        let r = self.inner.read_block(idx, buf);
        self.started.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        r
    }
}

#[test]
fn a_prefetch_never_installs_a_block_written_while_it_was_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    src.read(&mut buf, 3 * BSU).unwrap();
    let old = buf.clone();
    let (dst, _) = open(dir.path(), "dst", 8, &o);
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let peer = GatedPeer {
        inner: CacheSource::new(src.clone()),
        started: Mutex::new(started_tx),
        go: Mutex::new(go_rx),
    };
    dst.set_peer(Some(Arc::new(peer)));

    let d = dst.clone();
    let prefetch = std::thread::spawn(move || d.prefetch(BlockIdx(3)).unwrap());
    started_rx.recv().unwrap(); // the peer has read the old bytes; the fetch is in flight
    let new = vec![0x5au8; BS as usize];
    dst.write(&new, 3 * BSU, false).unwrap();
    go_tx.send(()).unwrap();
    let (_, installed) = prefetch.join().unwrap().unwrap();
    assert!(!installed, "a stale prefetch was installed");
    assert_eq!(dst.stats().prefetch_raced, 1);
    // The guest sees its write, never the older peer copy.
    dst.read(&mut buf, 3 * BSU).unwrap();
    assert_eq!(buf, new);
    assert_ne!(buf, old);

    // Control: without a write in between, the same prefetch is installed.
    go_tx.send(()).unwrap();
    let d = dst.clone();
    let prefetch = std::thread::spawn(move || d.prefetch(BlockIdx(3)));
    // Block 3 is cached now (written), so nothing is fetched at all.
    assert!(prefetch.join().unwrap().unwrap().is_none());
}

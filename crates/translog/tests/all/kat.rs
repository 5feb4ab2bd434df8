//! Known answers from the transparency-dev project's published test vectors
//! (github.com/transparency-dev/merkle, `proof/verify_test.go`: the eight RFC 6962
//! test leaves, the roots of their prefixes, and inclusion and consistency proofs),
//! checked against both the writer's proofs and the verifier.

use translog::hash::{empty_root, hash_from_hex, leaf_hash, Hash};
use translog::verify::{verify_consistency, verify_inclusion, RootFolder};
use translog::MerkleTree;

fn h(s: &str) -> Hash {
    hash_from_hex(s).unwrap()
}

fn leaves() -> Vec<Vec<u8>> {
    [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|s| translog::hash::from_hex(s).unwrap())
    .collect()
}

/// Root of the first `i + 1` leaves.
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf, size, proof): leaf is 1-based as in the published vectors.
fn inclusion_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
    vec![
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
            ],
        ),
        (
            6,
            8,
            vec![
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
        (
            3,
            3,
            vec![h(
                "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            )],
        ),
        (
            2,
            5,
            vec![
                h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            ],
        ),
    ]
}

/// (size1, size2, proof).
fn consistency_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
    vec![
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
            ],
        ),
        (
            6,
            8,
            vec![
                h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
        (
            2,
            5,
            vec![
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            ],
        ),
        (
            6,
            7,
            vec![
                h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
    ]
}

fn tree() -> MerkleTree {
    let mut t = MerkleTree::new();
    for l in leaves() {
        t.push(leaf_hash(&l));
    }
    t
}

#[test]
fn empty_tree_and_prefix_roots_match_the_published_roots() {
    assert_eq!(
        empty_root(),
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    let t = tree();
    let mut folder = RootFolder::default();
    for (i, l) in leaves().iter().enumerate() {
        folder.push(leaf_hash(l));
        assert_eq!(
            t.root_at(i as u64 + 1).unwrap(),
            h(ROOTS[i]),
            "writer, size {}",
            i + 1
        );
        assert_eq!(folder.root(), h(ROOTS[i]), "verifier, size {}", i + 1);
    }
}

/// The published corruptions of a valid proof (wrong index, size, leaf, root;
/// garbage before or after; a flipped bit; a dropped or inserted hash).
fn corrupt_inclusions(
    index: u64,
    size: u64,
    proof: &[Hash],
    root: Hash,
    leaf: Hash,
) -> Vec<(u64, u64, Hash, Hash, Vec<Hash>, String)> {
    let some = h("abacaba000000000000000000000000000000000000000000060061e00123456");
    let mut v = vec![
        (
            index.wrapping_sub(1),
            size,
            root,
            leaf,
            proof.to_vec(),
            "index - 1".to_owned(),
        ),
        (
            index + 1,
            size,
            root,
            leaf,
            proof.to_vec(),
            "index + 1".into(),
        ),
        (
            index ^ 2,
            size,
            root,
            leaf,
            proof.to_vec(),
            "index ^ 2".into(),
        ),
        (
            index,
            size * 2,
            root,
            leaf,
            proof.to_vec(),
            "size * 2".into(),
        ),
        (
            index,
            size / 2,
            root,
            leaf,
            proof.to_vec(),
            "size / 2".into(),
        ),
        (
            index,
            size,
            root,
            leaf_hash(b"WrongLeaf"),
            proof.to_vec(),
            "wrong leaf".into(),
        ),
        (
            index,
            size,
            empty_root(),
            leaf,
            proof.to_vec(),
            "empty root".into(),
        ),
        (
            index,
            size,
            some,
            leaf,
            proof.to_vec(),
            "random root".into(),
        ),
        (
            index,
            size,
            root,
            leaf,
            [proof, &[root]].concat(),
            "trailing root".into(),
        ),
        (
            index,
            size,
            root,
            leaf,
            [&[root], proof].concat(),
            "preceding root".into(),
        ),
    ];
    for i in 0..proof.len() {
        let mut p = proof.to_vec();
        p[i][0] ^= 8;
        v.push((index, size, root, leaf, p, format!("proof[{i}] bit 3")));
    }
    if !proof.is_empty() {
        v.push((
            index,
            size,
            root,
            leaf,
            proof[..proof.len() - 1].to_vec(),
            "removed".into(),
        ));
    }
    if proof.len() > 1 {
        let mut p = vec![proof[0], some];
        p.extend_from_slice(&proof[1..]);
        v.push((index, size, root, leaf, p, "inserted".into()));
    }
    v
}

#[test]
fn inclusion_proofs_match_the_vectors_and_corruptions_fail() {
    let t = tree();
    let leaves = leaves();
    for (leaf, size, proof) in inclusion_vectors() {
        let index = leaf - 1;
        assert_eq!(
            t.inclusion_proof(index, size).unwrap(),
            proof,
            "writer ({leaf}, {size})"
        );
        let root = h(ROOTS[size as usize - 1]);
        let lh = leaf_hash(&leaves[index as usize]);
        verify_inclusion(index, size, &lh, &proof, &root).unwrap();
        for (i, s, r, l, p, what) in corrupt_inclusions(index, size, &proof, root, lh) {
            assert!(
                verify_inclusion(i, s, &l, &p, &r).is_err(),
                "({leaf}, {size}) accepted with {what}"
            );
        }
    }
    // Every leaf of every prefix: the writer's proofs verify.
    for size in 1..=8u64 {
        for index in 0..size {
            let p = t.inclusion_proof(index, size).unwrap();
            let lh = leaf_hash(&leaves[index as usize]);
            verify_inclusion(index, size, &lh, &p, &h(ROOTS[size as usize - 1])).unwrap();
        }
    }
    // Out-of-range probes with an empty proof never verify.
    let some = h("abacaba000000000000000000000000000000000000000000060061e00123456");
    for (i, s) in [(0, 0), (0, 1), (1, 0), (2, 1)] {
        assert!(verify_inclusion(i, s, &some, &[], &empty_root()).is_err());
    }
}

#[test]
fn consistency_proofs_match_the_vectors_and_corruptions_fail() {
    let t = tree();
    for (s1, s2, proof) in consistency_vectors() {
        assert_eq!(
            t.consistency_proof(s1, s2).unwrap(),
            proof,
            "writer ({s1}, {s2})"
        );
        let (r1, r2) = (h(ROOTS[s1 as usize - 1]), h(ROOTS[s2 as usize - 1]));
        verify_consistency(s1, s2, &r1, &r2, &proof).unwrap();
        if proof.is_empty() {
            continue;
        }
        let mut bad: Vec<(u64, u64, Hash, Hash, Vec<Hash>, String)> = vec![
            (s1 - 1, s2, r1, r2, proof.clone(), "size1 - 1".into()),
            (s1 + 1, s2, r1, r2, proof.clone(), "size1 + 1".into()),
            (s1 ^ 2, s2, r1, r2, proof.clone(), "size1 ^ 2".into()),
            (s1, s2 * 2, r1, r2, proof.clone(), "size2 * 2".into()),
            (s1, s2 / 2, r1, r2, proof.clone(), "size2 / 2".into()),
            (
                s1,
                s2,
                leaf_hash(b"WrongRoot"),
                r2,
                proof.clone(),
                "wrong root1".into(),
            ),
            (
                s1,
                s2,
                r1,
                leaf_hash(b"WrongRoot"),
                proof.clone(),
                "wrong root2".into(),
            ),
            (s1, s2, r2, r1, proof.clone(), "swapped roots".into()),
            (s1, s2, r1, r2, vec![], "empty proof".into()),
            (
                s1,
                s2,
                r1,
                r2,
                [&proof[..], &[r1]].concat(),
                "trailing root1".into(),
            ),
            (
                s1,
                s2,
                r1,
                r2,
                [&proof[..], &[r2]].concat(),
                "trailing root2".into(),
            ),
            (
                s1,
                s2,
                r1,
                r2,
                [&[r1], &proof[..]].concat(),
                "preceding root1".into(),
            ),
            (
                s1,
                s2,
                r1,
                r2,
                [&[r2], &proof[..]].concat(),
                "preceding root2".into(),
            ),
            (
                s1,
                s2,
                r1,
                r2,
                [&[proof[0]], &proof[..]].concat(),
                "preceding proof[0]".into(),
            ),
            (
                s1,
                s2,
                r1,
                r2,
                proof[..proof.len() - 1].to_vec(),
                "truncated".into(),
            ),
        ];
        for i in 0..proof.len() {
            let mut p = proof.clone();
            p[i][0] ^= 16;
            bad.push((s1, s2, r1, r2, p, format!("proof[{i}] bit 4")));
        }
        for (a, b, x, y, p, what) in bad {
            assert!(
                verify_consistency(a, b, &x, &y, &p).is_err(),
                "({s1}, {s2}) accepted with {what}"
            );
        }
    }
    // Every pair of prefixes: the writer's proofs verify.
    for s2 in 1..=8u64 {
        for s1 in 1..=s2 {
            let p = t.consistency_proof(s1, s2).unwrap();
            let (r1, r2) = (h(ROOTS[s1 as usize - 1]), h(ROOTS[s2 as usize - 1]));
            verify_consistency(s1, s2, &r1, &r2, &p).unwrap();
        }
    }
    // The published edge cases: sizes always consistent, time travel, empty proofs.
    let (a, b) = (leaf_hash(b"don't care 1"), leaf_hash(b"don't care 2"));
    let e = empty_root();
    let cases: [(u64, u64, Hash, Hash, Vec<Hash>, bool); 13] = [
        (0, 0, a, b, vec![], false),
        (1, 1, a, b, vec![], false),
        (0, 0, a, a, vec![], true),
        (0, 1, a, b, vec![], true),
        (1, 1, b, b, vec![], true),
        (1, 0, a, b, vec![], false),
        (2, 1, a, b, vec![], false),
        (1, 2, a, b, vec![], false),
        (0, 0, e, b, vec![], false),
        (1, 1, e, b, vec![], false),
        (0, 0, e, e, vec![e], false),
        (0, 1, e, e, vec![e], false),
        (1, 1, e, e, vec![e], false),
    ];
    for (s1, s2, r1, r2, p, ok) in cases {
        assert_eq!(
            verify_consistency(s1, s2, &r1, &r2, &p).is_ok(),
            ok,
            "({s1}, {s2})"
        );
    }
}

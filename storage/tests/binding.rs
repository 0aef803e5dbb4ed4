//! Every object is what its key says (format versions 2 and 3): an intact object stored under
//! another key, copied from another repository, plaintext in an encrypted repository, or
//! in the old unbound format in a repository that binds everything, is refused by every
//! reader, naming the object. Old (version 1) repositories stay readable, and objects of
//! versions 2 and 3 mix in one repository.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use storage::format::{FrameHeader, Header, Trailer, FORMAT_VERSION};
use storage::keys::generate_identity;
use storage::{
    layout, ContentKind, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions, Repository,
    StorageError,
};

fn open(dir: &Path, f: impl FnOnce(&mut RepoOptions)) -> Repository {
    let mut o = RepoOptions {
        frame_size: 32 << 10,
        ..RepoOptions::default()
    };
    f(&mut o);
    Repository::open(&format!("file://{}", dir.display()), o).unwrap()
}

async fn marked(dir: &Path, f: impl FnOnce(&mut RepoOptions)) -> Repository {
    let repo = open(dir, f);
    repo.init_marker(&RepoMarker::new(RepoKind::Postgres))
        .await
        .unwrap();
    repo
}

fn seg(n: u32) -> RepoKey {
    let name = layout::WalSegmentName::parse(&format!("0000000100000000{n:08X}")).unwrap();
    layout::wal_segment(&name)
}

fn data(seed: u8) -> Bytes {
    Bytes::from(
        (0..100_000u32)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<_>>(),
    )
}

async fn put(repo: &Repository, key: &RepoKey, seed: u8) {
    repo.put(key, ContentKind::WalSegment, data(seed), PutMode::CreateNew)
        .await
        .unwrap();
}

/// Every way of reading `key` refuses it with `WrongObject`, and the message names the key
/// and contains `why`.
async fn assert_refused(repo: &Repository, key: &RepoKey, why: &str) {
    let errors: Vec<StorageError> = vec![
        repo.get(key).await.unwrap_err(),
        repo.info(key).await.unwrap_err(),
        repo.verify(key).await.unwrap_err(),
        match repo.reader(key).await {
            Ok(_) => panic!("reader opened {key}"),
            Err(e) => e,
        },
    ];
    for e in errors {
        let msg = e.to_string();
        assert!(matches!(e, StorageError::WrongObject { .. }), "{msg}");
        assert!(e.is_corrupt(), "{msg}");
        assert!(msg.contains(key.as_str()) && msg.contains(why), "{msg}");
    }
}

#[tokio::test]
async fn swapped_objects_are_refused_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let repo = marked(dir.path(), |_| {}).await;
    let (a, b) = (seg(6), seg(7));
    put(&repo, &a, 6).await;
    put(&repo, &b, 7).await;
    let (pa, pb) = (dir.path().join(a.as_str()), dir.path().join(b.as_str()));
    let (ba, bb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    std::fs::write(&pa, &bb).unwrap();
    std::fs::write(&pb, &ba).unwrap();
    assert_refused(&repo, &a, &format!("written for {b}")).await;
    assert_refused(&repo, &b, &format!("written for {a}")).await;
    // A fresh handle (no cached context) says the same.
    let fresh = open(dir.path(), |_| {});
    assert_refused(&fresh, &a, "written for").await;
}

#[tokio::test]
async fn a_header_rewritten_to_claim_the_key_fails_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = marked(dir.path(), |_| {}).await;
    let (a, b) = (seg(1), seg(2));
    put(&repo, &a, 1).await;
    // Copy a's object to b's key, rewriting the header's key (and its CRC) to say b.
    let bytes = std::fs::read(dir.path().join(a.as_str())).unwrap();
    let (mut h, hlen) = Header::parse("a", &bytes).unwrap().unwrap();
    h.binding.as_mut().unwrap().key = b.to_string();
    let mut forged = h.encode();
    assert_eq!(forged.len(), hlen, "same-length keys keep the layout");
    forged.extend_from_slice(&bytes[hlen..]);
    // The trailer's stored CRC covers the header: recompute it as an attacker would.
    let n = forged.len();
    let (tr_at, body) = (n - 68, &forged[..n - 68]);
    let mut t = Trailer::parse("a", &forged[tr_at..], 0).unwrap();
    t.stored_crc = crc32c::crc32c(body);
    forged[tr_at..].copy_from_slice(&t.encode());
    let path = dir.path().join(b.as_str());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &forged).unwrap();
    let e = repo.get(&b).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, StorageError::Corrupt { .. })
            && msg.contains("sha256 of key, repository and content"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_object_from_another_repository_is_refused_and_a_whole_copy_is_not() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r1 = marked(one.path(), |_| {}).await;
    let r2 = marked(two.path(), |_| {}).await;
    let id1 = r1.repository_id().await.unwrap();
    let id2 = r2.repository_id().await.unwrap();
    assert_ne!(id1, id2);
    let key = seg(3);
    put(&r1, &key, 3).await;
    let p2 = two.path().join(key.as_str());
    std::fs::create_dir_all(p2.parent().unwrap()).unwrap();
    std::fs::copy(one.path().join(key.as_str()), &p2).unwrap();
    assert_refused(&r2, &key, &format!("belongs to repository {id1}")).await;

    // A verbatim copy of the whole repository (a second region) keeps its id.
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", one.path().display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let r3 = open(copy.path(), |_| {});
    assert_eq!(r3.repository_id().await.unwrap(), id1);
    assert_eq!(r3.get(&key).await.unwrap(), data(3));
}

#[tokio::test]
async fn encrypted_version_4_objects_keep_blake3_and_plaintext_ones_use_xxh3() {
    // The content hash inside an encrypted object's digest must stay one nobody can compute
    // without the plaintext; a plaintext object's only has to catch accidents.
    use storage::format::ContentHash;
    let dir = tempfile::tempdir().unwrap();
    let id = generate_identity();
    let writer = marked(dir.path(), |o| o.recipients = vec![id.to_public()]).await;
    put(&writer, &seg(4), 4).await;
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    let info = reader.verify(&seg(4)).await.unwrap().info;
    assert_eq!((info.format_version, info.encrypted), (4, true));
    assert_eq!(info.content_hash(), ContentHash::Blake3);
    assert!(info.matches_content(&[data(4)]));
    let xxh3 = ContentHash::Xxh3.digest(&[data(4)]);
    assert!(!info.matches_content_digest(&xxh3, data(4).len() as u64));

    let plain_dir = tempfile::tempdir().unwrap();
    let plain = marked(plain_dir.path(), |_| {}).await;
    put(&plain, &seg(4), 4).await;
    let info = plain.verify(&seg(4)).await.unwrap().info;
    assert_eq!((info.format_version, info.encrypted), (4, false));
    assert_eq!(info.content_hash(), ContentHash::Xxh3);
    assert!(info.matches_content_digest(&xxh3, data(4).len() as u64));
}

#[tokio::test]
async fn plaintext_in_an_encrypted_repository_is_refused_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let id = generate_identity();
    let writer = marked(dir.path(), |o| o.recipients = vec![id.to_public()]).await;
    let key = seg(4);
    put(&writer, &key, 4).await;
    // Someone without the key replaces the object with a plaintext one of their own.
    let intruder = open(dir.path(), |_| {});
    intruder
        .put(&key, ContentKind::WalSegment, data(9), PutMode::Overwrite)
        .await
        .unwrap();
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    assert_refused(&reader, &key, "not encrypted, but the repository is").await;
    // Without an identity (`repo check` on a sidecar) it is refused as well.
    let no_identity = open(dir.path(), |_| {});
    let e = no_identity.verify(&key).await.unwrap_err();
    assert!(matches!(e, StorageError::WrongObject { .. }), "{e}");
}

/// The marker is not authenticated: someone who can write to the bucket replaces an
/// encrypted repository's marker by one saying "not encrypted" (same repository id, or an
/// old-format marker without one), or deletes it, then puts a plaintext object bound to
/// it. A reader holding the identity must not take that object.
#[tokio::test]
async fn a_marker_rewritten_to_unencrypted_does_not_let_plaintext_in() {
    let dir = tempfile::tempdir().unwrap();
    let id = generate_identity();
    let writer = marked(dir.path(), |o| o.recipients = vec![id.to_public()]).await;
    let repo_id = writer.repository_id().await.unwrap();
    let key = seg(4);
    put(&writer, &key, 4).await;
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    assert_eq!(reader.get(&key).await.unwrap(), data(4));

    // 1. A marker with the same id but no encryption, then a plaintext object bound to it.
    let marker_path = dir.path().join(layout::marker().as_str());
    let json = format!(r#"{{"kind":"postgres","format_version":2,"repository_id":"{repo_id}"}}"#);
    std::fs::remove_file(&marker_path).unwrap();
    let intruder = open(dir.path(), |_| {});
    // Write the forged marker through the library, as a version 2 build would.
    intruder
        .put(
            &layout::marker(),
            ContentKind::Marker,
            Bytes::from(json),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    let forged = std::fs::read(&marker_path).unwrap();
    // The library bound it to the all-zero id (no marker when it was written): rebind it
    // to the repository id by hand, as an attacker would.
    let forged = rebind(&forged, repo_id);
    std::fs::write(&marker_path, &forged).unwrap();
    let intruder = open(dir.path(), |_| {});
    assert_eq!(intruder.repository_id().await.unwrap(), repo_id);
    intruder
        .put(&key, ContentKind::WalSegment, data(9), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        intruder.get(&key).await.unwrap(),
        data(9),
        "the forgery is well-formed"
    );
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    let e = reader.get(&key).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        e.is_corrupt() && msg.contains("syncbridge-repo") && msg.contains("not encrypted"),
        "{msg}"
    );

    // 2. An old-format marker (no id, no encryption), and an old-format plaintext object.
    let old = br#"{"kind":"postgres","format_version":1}"#;
    write_file(
        dir.path(),
        &layout::marker(),
        &v1_object(ContentKind::Marker, old),
    );
    write_file(
        dir.path(),
        &key,
        &v1_object(ContentKind::WalSegment, &data(8)),
    );
    assert_eq!(open(dir.path(), |_| {}).get(&key).await.unwrap(), data(8));
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    let e = reader.get(&key).await.unwrap_err();
    assert!(
        e.is_corrupt() && e.to_string().contains("not encrypted"),
        "{e}"
    );

    // 3. No marker at all.
    std::fs::remove_file(&marker_path).unwrap();
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    let e = reader.get(&key).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, StorageError::WrongObject { .. })
            && msg.contains(key.as_str())
            && msg.contains("not encrypted"),
        "{msg}"
    );
}

/// `bytes` (a version 2 to 4 object) with its header's repository id replaced by `id`, and
/// the trailer's digest and CRCs recomputed: what anyone holding the plaintext can do.
fn rebind(bytes: &[u8], id: storage::format::RepoId) -> Vec<u8> {
    let (mut h, hlen) = Header::parse("k", bytes).unwrap().unwrap();
    h.binding.as_mut().unwrap().repo_id = id;
    let mut out = h.encode();
    assert_eq!(out.len(), hlen);
    out.extend_from_slice(&bytes[hlen..bytes.len() - 68]);
    // One raw frame (a short marker is stored raw or zstd; read it back via its frame).
    let fh = FrameHeader::parse("k", &out[hlen..hlen + 20], 0, h.frame_size).unwrap();
    let payload = &out[hlen + 20..];
    let content = if fh.flags & storage::format::FRAME_ZSTD != 0 {
        zstd::decode_all(payload).unwrap()
    } else {
        payload.to_vec()
    };
    let hash = storage::format::ContentHash::of_object(h.version, h.encrypted);
    let inner = hash.digest(&[&content]);
    let t = Trailer {
        frame_count: 1,
        original_len: content.len() as u64,
        sha256: storage::format::bound_digest(&inner, h.binding.as_ref().unwrap(), hash),
        stored_crc: crc32c::crc32c(&out),
    };
    out.extend_from_slice(&t.encode());
    out
}

/// A format version 1 object, laid out by hand as a version 1 build wrote it: one raw
/// frame, the trailer's SHA-256 of the plain content.
fn v1_object(kind: ContentKind, content: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut out = Header {
        version: 1,
        kind,
        codec: storage::format::Codec::None,
        encrypted: false,
        original_len: Some(content.len() as u64),
        frame_size: 1 << 20,
        recipients: vec![],
        binding: None,
    }
    .encode();
    if !content.is_empty() {
        let fh = FrameHeader {
            flags: 0,
            stored_len: content.len() as u32,
            original_len: content.len() as u32,
            payload_crc: crc32c::crc32c(content),
        };
        out.extend_from_slice(&fh.encode());
        out.extend_from_slice(content);
    }
    let t = Trailer {
        frame_count: u64::from(!content.is_empty()),
        original_len: content.len() as u64,
        sha256: Sha256::digest(content).into(),
        stored_crc: crc32c::crc32c(&out),
    };
    out.extend_from_slice(&t.encode());
    out
}

fn write_file(dir: &Path, key: &RepoKey, bytes: &[u8]) {
    let path = dir.join(key.as_str());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_version_1_repository_stays_readable_and_writable() {
    let dir = tempfile::tempdir().unwrap();
    let marker = br#"{"kind":"postgres","format_version":1,"system_identifier":"7"}"#;
    write_file(
        dir.path(),
        &layout::marker(),
        &v1_object(ContentKind::Marker, marker),
    );
    let old = seg(1);
    write_file(
        dir.path(),
        &old,
        &v1_object(ContentKind::WalSegment, &data(1)),
    );
    let repo = open(dir.path(), |_| {});
    assert_eq!(repo.get(&old).await.unwrap(), data(1));
    let info = repo.info(&old).await.unwrap();
    assert!(info.binding.is_none());
    {
        use sha2::{Digest, Sha256};
        let sha: [u8; 32] = Sha256::digest(data(1)).into();
        assert!(info.matches_content_digest(&sha, data(1).len() as u64));
        assert!(info.matches_content(&[data(1)]));
    }
    // New objects in an old repository are bound (to an id derived from its marker).
    let new = seg(2);
    put(&repo, &new, 2).await;
    let info = repo.info(&new).await.unwrap();
    assert_eq!(
        info.binding.unwrap().repo_id,
        repo.repository_id().await.unwrap()
    );
    assert_eq!(open(dir.path(), |_| {}).get(&new).await.unwrap(), data(2));
    // The marker keeps its old form: nothing rewrote it.
    let m = repo.read_marker().await.unwrap().unwrap();
    assert!(m.repository_id.is_none());
}

#[tokio::test]
async fn an_unbound_object_in_a_bound_repository_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = marked(dir.path(), |_| {}).await;
    let key = seg(5);
    write_file(
        dir.path(),
        &key,
        &v1_object(ContentKind::WalSegment, &data(5)),
    );
    assert_refused(&repo, &key, "format version 1").await;
    assert_eq!(FORMAT_VERSION, 4);
}

#[tokio::test]
async fn leases_stay_readable_plaintext_and_from_before_the_marker() {
    // A lease may be written before the marker exists and is plaintext by design (waiting
    // agents hold only recipients); it is checked for its key only.
    let dir = tempfile::tempdir().unwrap();
    let key = layout::lease(storage::LeaseScope::RedisStream, 1);
    let early = open(dir.path(), |_| {});
    early
        .put(
            &key,
            ContentKind::Other,
            Bytes::from_static(b"{}"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    let id = generate_identity();
    marked(dir.path(), |o| o.recipients = vec![id.to_public()]).await;
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    assert_eq!(reader.get(&key).await.unwrap(), Bytes::from_static(b"{}"));
    reader.verify(&key).await.unwrap();
    // Still bound to its key: a lease object under another lease key is refused.
    let other = layout::lease(storage::LeaseScope::RedisStream, 2);
    std::fs::copy(
        dir.path().join(key.as_str()),
        dir.path().join(other.as_str()),
    )
    .unwrap();
    let e = reader.get(&other).await.unwrap_err();
    assert!(matches!(e, StorageError::WrongObject { .. }), "{e}");
}

/// `bytes` (a version 2 to 4 object) with its header changed by `edit` and the header and
/// stored CRCs recomputed (the trailer's digest left as it is): what anyone who can write to
/// the bucket can do, as the CRCs are no secret.
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut Header)) -> Vec<u8> {
    let (mut h, hlen) = Header::parse("k", bytes).unwrap().unwrap();
    edit(&mut h);
    let mut out = h.encode();
    assert_eq!(out.len(), hlen);
    out.extend_from_slice(&bytes[hlen..]);
    let n = out.len();
    let mut t = Trailer::parse("k", &out[n - 68..], 0).unwrap();
    t.stored_crc = crc32c::crc32c(&out[..n - 68]);
    out[n - 68..].copy_from_slice(&t.encode());
    out
}

#[tokio::test]
async fn an_encryption_flag_rewritten_either_way_is_refused() {
    // The flag picks the content hash in version 4 (BLAKE3 when encrypted, XXH3-128 when
    // not), so it is one more header field someone could rewrite to change how an object
    // is checked. Encrypted → plaintext is refused by the repository's encryption (check 4
    // of Binding); plaintext → encrypted by the frames, which are not age files.
    let dir = tempfile::tempdir().unwrap();
    let id = generate_identity();
    let writer = marked(dir.path(), |o| o.recipients = vec![id.to_public()]).await;
    put(&writer, &seg(1), 1).await;
    let path = dir.path().join(seg(1).as_str());
    std::fs::write(
        &path,
        with_header(&std::fs::read(&path).unwrap(), |h| h.encrypted = false),
    )
    .unwrap();
    let reader = open(dir.path(), |o| o.identities = vec![id.clone()]);
    assert_refused(&reader, &seg(1), "not encrypted, but the repository is").await;

    let plain_dir = tempfile::tempdir().unwrap();
    let plain = marked(plain_dir.path(), |_| {}).await;
    put(&plain, &seg(2), 2).await;
    let path = plain_dir.path().join(seg(2).as_str());
    std::fs::write(
        &path,
        with_header(&std::fs::read(&path).unwrap(), |h| h.encrypted = true),
    )
    .unwrap();
    let with_identity = open(plain_dir.path(), |o| o.identities = vec![id.clone()]);
    for r in [&plain, &with_identity] {
        assert!(r.get(&seg(2)).await.is_err());
        assert!(r.verify(&seg(2)).await.is_err());
    }
}

#[tokio::test]
async fn versions_2_3_and_4_mix_in_one_repository() {
    // A repository created by a version 2 build (its marker a version 2 object), written to
    // by a version 3 build, then by this build: old objects stay readable, new ones are
    // version 4.
    use storage::format::ContentHash;
    let dir = tempfile::tempdir().unwrap();
    let old = marked(dir.path(), |o| o.format_version = 2).await;
    let m = old.read_marker().await.unwrap().unwrap();
    assert_eq!(m.format_version, 2);
    put(&old, &seg(1), 1).await;
    put(&open(dir.path(), |o| o.format_version = 3), &seg(2), 2).await;
    let repo = open(dir.path(), |_| {});
    put(&repo, &seg(3), 3).await;
    let all = [ContentHash::Sha256, ContentHash::Blake3, ContentHash::Xxh3];
    for (n, version, hash) in [
        (1u8, 2u16, ContentHash::Sha256),
        (2, 3, ContentHash::Blake3),
        (3, 4, ContentHash::Xxh3),
    ] {
        let key = seg(u32::from(n));
        let info = repo.info(&key).await.unwrap();
        assert_eq!(info.format_version, version, "{key}");
        assert_eq!(info.content_hash(), hash, "{key}");
        assert_eq!(repo.get(&key).await.unwrap(), data(n));
        assert_eq!(repo.verify(&key).await.unwrap().info, info);
        assert!(info.matches_content(&[data(n)]));
        assert!(!info.matches_content(&[data(n + 1)]));
        // Another hash of the same bytes does not match.
        for other in all.iter().filter(|h| **h != hash) {
            let d = other.digest(&[data(n)]);
            assert!(!info.matches_content_digest(&d, data(n).len() as u64));
        }
    }
    let bytes = std::fs::read(dir.path().join(seg(3).as_str())).unwrap();
    assert_eq!(Header::parse("k", &bytes).unwrap().unwrap().0.version, 4);
    // A new repository says version 4 in its marker.
    let fresh = tempfile::tempdir().unwrap();
    let r = marked(fresh.path(), |_| {}).await;
    assert_eq!(r.read_marker().await.unwrap().unwrap().format_version, 4);
    // Versions outside 2..=4 cannot be written.
    for v in [0u16, 1, 5] {
        let o = RepoOptions {
            format_version: v,
            ..RepoOptions::default()
        };
        let err = Repository::open(&format!("file://{}", fresh.path().display()), o)
            .unwrap_err()
            .to_string();
        assert!(err.contains("format version"), "{v}: {err}");
    }
}

#[tokio::test]
async fn a_header_rewritten_to_another_version_fails_the_digest() {
    // The header's version (with its encryption flag) decides the content hash; its CRC is
    // no secret, so someone can rewrite it. The digest's domain names the content hash too:
    // a plaintext object is refused whichever other version it claims, never read with
    // another hash. (An encrypted object is hashed with BLAKE3 in versions 3 and 4 alike,
    // so relabelling one between them changes nothing that is read.)
    let dir = tempfile::tempdir().unwrap();
    let v2 = marked(dir.path(), |o| o.format_version = 2).await;
    put(&v2, &seg(1), 1).await;
    let repo = open(dir.path(), |_| {});
    put(&repo, &seg(2), 2).await;
    put(&repo, &seg(3), 3).await;
    put(&open(dir.path(), |o| o.format_version = 3), &seg(4), 4).await;
    put(&open(dir.path(), |o| o.format_version = 3), &seg(5), 5).await;
    // 2 → 3, 4 → 2, 4 → 3, 3 → 4, 3 → 2.
    for (n, to) in [(1u32, 3u16), (2, 2), (3, 3), (4, 4), (5, 2)] {
        let path = dir.path().join(seg(n).as_str());
        let forged = with_header(&std::fs::read(&path).unwrap(), |h| h.version = to);
        std::fs::write(&path, forged).unwrap();
        for e in [
            repo.get(&seg(n)).await.unwrap_err(),
            repo.verify(&seg(n)).await.unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(
                matches!(e, StorageError::Corrupt { .. })
                    && msg.contains("sha256 of key, repository and content"),
                "{msg}"
            );
        }
    }
}

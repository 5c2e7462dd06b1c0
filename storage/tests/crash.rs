//! Crash test: a child process writes through a `StoreHandle` and reports each write only after it is
//! acknowledged (hence flushed). The parent SIGKILLs it at random moments, reopens the store after every kill,
//! and checks that every reported write is there, that no record fails its integrity check, and that every batch
//! is all there or not at all.
//!
//! The child is this same test binary, re-executed with `CHILD_DIR_ENV` set, running this same test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_storage::{
    Batch, KEY_FILE, KeySource, Keyspace, STORE_DIR, Scan, Sealed, SledStore, Store, Unlock,
};

const TEST_NAME: &str = "acknowledged_writes_survive_sigkill";
/// Set in the child: the data dir to write to.
const CHILD_DIR_ENV: &str = "HEARTH_STORAGE_CRASH_CHILD_DIR";
/// Set in the child: the round number, so each round writes fresh keys.
const CHILD_ROUND_ENV: &str = "HEARTH_STORAGE_CRASH_ROUND";
const KILLS: u32 = 50;
const WRITERS: u32 = 4;
/// A child that was somehow not killed stops by itself after this long.
const CHILD_MAX_LIFE: Duration = Duration::from_secs(30);
/// Marks report lines, so the test harness's own output is ignored.
const ACK: &str = "ACK";

/// The value stored under `key`: derived from the key, of varying length, so the parent can check it exactly.
fn value_for(key: &str) -> Vec<u8> {
    let len = 40 + key.len() * 7 % 300;
    key.bytes().cycle().take(len).collect()
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    match std::env::var(CHILD_DIR_ENV) {
        Ok(dir) => child(Path::new(&dir)),
        Err(_) => parent(),
    }
}

/// Writes until killed. Each writer task puts single records, writes 3-record batches, and deletes some of its
/// own earlier records, printing each only once its future returned `Ok`.
fn child(dir: &Path) {
    let round: u32 = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = hearth_storage::open(dir, KeySource::KeyFile).unwrap();
        let deadline = Instant::now() + CHILD_MAX_LIFE;
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u32;
                let mut deletable = Vec::new();
                while Instant::now() < deadline {
                    seq += 1;
                    let base = format!("r{round:03}-w{writer}-{seq:06}");
                    let line = if seq.is_multiple_of(5) {
                        let mut batch = Batch::new();
                        let keys: Vec<String> = (0..3).map(|i| format!("{base}-b{i}")).collect();
                        for key in &keys {
                            batch.put(Keyspace::DocChunks, key.as_bytes(), value_for(key));
                        }
                        store.batch(batch).await.unwrap();
                        format!("{ACK} B {}", keys.join(" "))
                    } else if seq.is_multiple_of(7) && !deletable.is_empty() {
                        let key: String = deletable.remove(0);
                        // Announce the delete first: a kill between its acknowledgement and the report below
                        // must not make the parent expect the record.
                        report(&format!("{ACK} d {key}"));
                        store
                            .delete(Keyspace::DocChunks, key.as_bytes())
                            .await
                            .unwrap();
                        format!("{ACK} D {key}")
                    } else {
                        store
                            .put(Keyspace::DocChunks, base.as_bytes(), value_for(&base))
                            .await
                            .unwrap();
                        deletable.push(base.clone());
                        format!("{ACK} P {base}")
                    };
                    report(&line);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// Writes one report line straight to fd 1 and flushes it, so the parent has it before a kill can land.
fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// What the store must hold under a key after a kill. Values are checked whenever a record is opened.
#[derive(Debug)]
enum Expect {
    /// An acknowledged put (and no delete announced since).
    Present,
    /// A delete was announced but not acknowledged: either outcome is fine.
    Either,
    /// An acknowledged delete.
    Absent,
}

/// A small xorshift generator: enough to spread kill times, and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed:#x}");
    let mut rng = Rng(seed);
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();

    let mut expected: BTreeMap<String, Expect> = BTreeMap::new();
    // Sealed bytes of records already opened and checked, by key.
    let mut verified: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut rounds_with_acks = 0;
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|line| line.starts_with(ACK))
                .collect::<Vec<_>>()
        });

        // Anywhere from during start-up and open to well into the writing.
        thread::sleep(Duration::from_millis(rng.next() % 400));
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("round {round}: the child exited by itself ({status}):\n{stderr}");
        }
        // std's kill sends SIGKILL on Unix.
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        if !lines.is_empty() {
            rounds_with_acks += 1;
        }
        for line in &lines {
            let mut words = line.split(' ').skip(1);
            match words.next() {
                Some("P") | Some("B") => {
                    for key in words {
                        expected.insert(key.to_owned(), Expect::Present);
                    }
                }
                Some("d") => {
                    let key = words.next().unwrap();
                    expected.insert(key.to_owned(), Expect::Either);
                }
                Some("D") => {
                    let key = words.next().unwrap();
                    expected.insert(key.to_owned(), Expect::Absent);
                }
                _ => panic!("round {round}: malformed report {line:?}"),
            }
        }
        verify(dir.path(), &expected, &mut verified, round);
    }

    let acked = expected.len();
    eprintln!(
        "crash test: {KILLS} kills, {acked} acknowledged writes checked, {rounds_with_acks} rounds wrote, {:?}",
        started.elapsed()
    );
    // Guard against a test that passes because nothing was ever written before the kill.
    assert!(
        rounds_with_acks >= KILLS / 2,
        "only {rounds_with_acks} rounds acknowledged any write"
    );
    assert!(acked >= 200, "only {acked} writes were acknowledged in all");
}

/// Reopens the store as the node would and checks it against what was acknowledged.
fn verify(
    dir: &Path,
    expected: &BTreeMap<String, Expect>,
    verified: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    round: u32,
) {
    let path = dir.join(STORE_DIR);
    let sled = SledStore::open(&path, 8 << 20, false)
        .unwrap_or_else(|e| panic!("round {round}: reopening after the kill failed: {e}"));
    let store = Sealed::open(sled, Unlock::KeyFile(&dir.join(KEY_FILE)), &path)
        .unwrap_or_else(|e| panic!("round {round}: unsealing after the kill failed: {e}"));

    // Read every record, page by page. A sealed value byte-identical to one that opened correctly in an earlier
    // round still opens; every other one is opened here, and any integrity failure fails the test. (Opening all
    // of them every round would cost seconds in a debug build, where the cipher runs unoptimised.)
    let mut present: BTreeSet<String> = BTreeSet::new();
    let mut scan = Scan::all().limit(10_000);
    loop {
        let page = store
            .inner()
            .scan(Keyspace::DocChunks, &scan)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let Some((last, _)) = page.last() else { break };
        scan = Scan::all().limit(10_000).after(last.clone());
        for (key, sealed) in page {
            if verified.get(&key) != Some(&sealed) {
                let value = store
                    .open_record(Keyspace::DocChunks, &key, &sealed)
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                let name = String::from_utf8(key.clone()).unwrap();
                // Unacknowledged records may be present, but never with a wrong value.
                assert_eq!(
                    value,
                    value_for(&name),
                    "round {round}: {name} has the wrong value"
                );
                verified.insert(key.clone(), sealed);
            }
            present.insert(String::from_utf8(key).unwrap());
        }
    }

    let mut lost = Vec::new();
    let mut undeleted = Vec::new();
    for (key, want) in expected {
        match (want, present.contains(key)) {
            (Expect::Present, false) => lost.push(key.as_str()),
            (Expect::Absent, true) => undeleted.push(key.as_str()),
            _ => {}
        }
    }
    let this_round = format!("r{round:03}-");
    let newest: Vec<_> = present
        .iter()
        .filter(|k| k.starts_with(&this_round))
        .rev()
        .take(8)
        .collect();
    assert!(
        lost.is_empty() && undeleted.is_empty(),
        "round {round}: after the kill, {} acknowledged writes are missing ({:?}) and {} acknowledged deletes \
         were undone ({:?}); newest keys of this round present: {newest:?}",
        lost.len(),
        &lost[..lost.len().min(20)],
        undeleted.len(),
        &undeleted[..undeleted.len().min(20)],
    );

    // Batches are atomic: of each batch's three keys, all or none are present, acknowledged or not.
    let mut batches: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for key in &present {
        if let Some((base, part)) = key.rsplit_once("-b") {
            batches.entry(base).or_default().insert(part);
        }
    }
    for (base, parts) in batches {
        assert_eq!(
            parts.len(),
            3,
            "round {round}: batch {base} is torn: only {parts:?} present"
        );
    }
}

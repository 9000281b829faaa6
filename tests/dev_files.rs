//! `sagaflow dev`'s SQLite files: the engine's (`--db`) and one per service beside it. They are
//! resumed together, a run never starts with one missing while the others hold a run's data, a
//! file of earlier versions (the services inside the engine's) is kept as it is, and a run
//! killed with SIGKILL is finished by the next with every invariant holding.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory of its own, removed at the end even when the test fails.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("sagaflow-dev-files-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The file names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sagaflow(dir: &Dir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("run sagaflow")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(dir: &Dir, args: &[&str]) -> String {
    let out = sagaflow(dir, args);
    assert!(
        out.status.success(),
        "sagaflow {args:?} failed:\n{}",
        text(&out)
    );
    let t = text(&out);
    assert!(t.contains("invariants:      OK"), "{t}");
    t
}

/// `sagaflow args` exits 1 and says `message`.
fn refused(dir: &Dir, args: &[&str], message: &str) {
    let out = sagaflow(dir, args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(message), "{}", text(&out));
}

/// A SQLite file renamed with its WAL and shared-memory companions (a WAL file beside another
/// database would be read as that one's).
fn rename_db(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let (mut f, mut t) = (from.as_os_str().to_owned(), to.as_os_str().to_owned());
        f.push(suffix);
        t.push(suffix);
        if Path::new(&f).exists() {
            std::fs::rename(&f, &t).expect("rename");
        }
    }
}

/// A SQLite file with its WAL and shared-memory companions.
fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// The services' files of the services' name `base` (`sagaflow.services` →
/// `sagaflow.services.payment.db`, …).
fn service_files(base: &str) -> Vec<String> {
    ["payment", "coupon", "points", "gmv"]
        .iter()
        .map(|s| format!("{base}.{s}.db"))
        .collect()
}

#[test]
fn the_files_are_made_and_resumed_together() {
    let dir = Dir::new("resume");
    let first = ok(&dir, &["dev", "--orders", "20"]);
    assert!(
        first.contains(
            "sagaflow dev: order-paid (sagaflow.db; services in sagaflow.services.{payment,coupon,points,gmv}.db)"
        ),
        "{first}"
    );
    let names = dir.names();
    assert!(names.contains(&"sagaflow.db".to_owned()), "{names:?}");
    for file in service_files("sagaflow.services") {
        assert!(names.contains(&file), "{file}: {names:?}");
    }
    assert!(
        !names.contains(&"sagaflow.services.db".to_owned()),
        "{names:?}"
    );

    let second = ok(&dir, &["dev", "--orders", "10"]);
    assert!(
        second.contains("all sagas in db: 30 (30 completed)"),
        "{second}"
    );
    assert!(second.contains("(30 sagas checked)"), "{second}");

    // Named files of one's own.
    let named = ok(
        &dir,
        &[
            "dev",
            "--db",
            "e.db",
            "--services-db",
            "s.db",
            "--orders",
            "5",
        ],
    );
    assert!(
        named.contains("(e.db; services in s.{payment,coupon,points,gmv}.db)"),
        "{named}"
    );
    assert!(dir.path("s.payment.db").is_file());
    assert!(!dir.path("s.db").exists());
}

#[test]
fn a_run_does_not_start_with_one_file_missing() {
    let dir = Dir::new("missing");
    ok(&dir, &["dev", "--orders", "5"]);

    // The engine's file gone: refused, and not made anew (the next run would refuse the same).
    remove_db(&dir.path("sagaflow.db"));
    refused(
        &dir,
        &["dev", "--orders", "5"],
        "sagaflow.services.payment.db holds the services' tables of an earlier run, but their engine database sagaflow.db is missing",
    );
    assert!(!dir.path("sagaflow.db").exists(), "{:?}", dir.names());

    // The services' files gone after a run: refused, naming them — even when an operator
    // command (which migrates the services' tables into the engine's file, empty) ran between.
    for file in service_files("sagaflow.services") {
        remove_db(&dir.path(&file));
    }
    ok(&dir, &["dev", "--orders", "5"]);
    let listed = sagaflow(&dir, &["list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    // One service's file gone: refused, naming it, and not made anew.
    remove_db(&dir.path("sagaflow.services.coupon.db"));
    refused(
        &dir,
        &["dev", "--orders", "5"],
        "sagaflow.db was run with the services' database sagaflow.services.{payment,coupon,points,gmv}.db, of which sagaflow.services.coupon.db is missing",
    );
    assert!(
        !dir.path("sagaflow.services.coupon.db").exists(),
        "{:?}",
        dir.names()
    );
    // All of them gone.
    for file in service_files("sagaflow.services") {
        remove_db(&dir.path(&file));
    }
    refused(
        &dir,
        &["dev", "--orders", "5"],
        "sagaflow.db was run with the services' database sagaflow.services.{payment,coupon,points,gmv}.db (or sagaflow.services.db, as earlier versions kept it), which is missing",
    );
    assert!(
        dir.names()
            .iter()
            .all(|n| !n.starts_with("sagaflow.services")),
        "{:?}",
        dir.names()
    );
}

#[test]
fn files_of_two_runs_are_not_taken_for_a_pair() {
    let dir = Dir::new("pairs");
    ok(&dir, &["dev", "--db", "a.db", "--orders", "5"]);
    ok(&dir, &["dev", "--db", "b.db", "--orders", "5"]);
    // a's engine with b's services: refused before anything runs.
    refused(
        &dir,
        &[
            "dev",
            "--db",
            "a.db",
            "--services-db",
            "b.services.db",
            "--orders",
            "5",
        ],
        "a.db and b.services.{payment,coupon,points,gmv}.db do not belong together",
    );
    // Each with its own still runs, and the refused run changed nothing.
    let t = ok(&dir, &["dev", "--db", "a.db", "--orders", "1"]);
    assert!(t.contains("all sagas in db: 6 (6 completed)"), "{t}");

    // Two services' files of one set swapped: each carries its service's name in its mark.
    let (coupon, points) = (
        dir.path("a.services.coupon.db"),
        dir.path("a.services.points.db"),
    );
    let swap = dir.path("swap.db");
    rename_db(&coupon, &swap);
    rename_db(&points, &coupon);
    rename_db(&swap, &points);
    refused(
        &dir,
        &["dev", "--db", "a.db", "--orders", "1"],
        "a.services.coupon.db and a.services.points.db do not carry the mark of a.db's run",
    );
    // A service's file given as the services' name: refused.
    refused(
        &dir,
        &[
            "dev",
            "--db",
            "b.db",
            "--services-db",
            "b.services.payment.db",
        ],
        "names the payment service's file",
    );

    // The engine's own file, spelled otherwise, as the services': refused.
    refused(
        &dir,
        &["dev", "--db", "a.db", "--services-db", "./a.db"],
        "--services-db names the engine's own file a.db",
    );
    // Another set's engine as an engine's services' file: refused, and that set still runs.
    ok(&dir, &["dev", "--db", "c.db", "--orders", "1"]);
    refused(
        &dir,
        &[
            "dev",
            "--db",
            "c.db",
            "--services-db",
            "b.db",
            "--orders",
            "1",
        ],
        "b.db is an engine's database, not a services' file",
    );
    let t = ok(&dir, &["dev", "--db", "b.db", "--orders", "1"]);
    assert!(t.contains("all sagas in db: 6 (6 completed)"), "{t}");
    // A service's file as the engine's: refused before anything is written to it.
    refused(
        &dir,
        &["dev", "--db", "b.services.gmv.db", "--orders", "1"],
        "b.services.gmv.db is a service's file of a sagaflow dev set (its mark says `gmv`)",
    );
    // A set's engine run with --database-url (its services' tables would be the empty ones
    // inside it): refused.
    let url = format!("sqlite://{}", dir.path("b.db").display());
    refused(
        &dir,
        &["dev", "--database-url", &url, "--orders", "1"],
        "is the engine's file of a sagaflow dev set",
    );
    let t = ok(&dir, &["dev", "--db", "b.db", "--orders", "1"]);
    assert!(t.contains("all sagas in db: 7 (7 completed)"), "{t}");

    // The engine's own file as the services': refused.
    refused(
        &dir,
        &["dev", "--db", "a.db", "--services-db", "a.db"],
        "--services-db names the engine's own file a.db",
    );
    // With one database for everything there is no services' file to name.
    let url = format!("sqlite://{}?mode=rwc", dir.path("one.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(["dev", "--services-db", "s.db", "--orders", "1"])
        .env("SAGAFLOW_DATABASE_URL", &url)
        .current_dir(&dir.0)
        .output()
        .expect("run sagaflow");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--services-db names a SQLite file beside --db"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_file_with_the_services_inside_is_kept_as_one() {
    let dir = Dir::new("one-file");
    // One database for both, as `--database-url` has it (and as runs before the split wrote).
    let url = format!("sqlite://{}?mode=rwc", dir.path("old.db").display());
    ok(&dir, &["dev", "--database-url", &url, "--orders", "10"]);

    let t = ok(&dir, &["dev", "--db", "old.db", "--orders", "5"]);
    assert!(t.contains("sagaflow dev: order-paid (old.db)\n"), "{t}");
    assert!(t.contains("all sagas in db: 15 (15 completed)"), "{t}");
    assert!(
        dir.names().iter().all(|n| !n.starts_with("old.services")),
        "no services' file: {:?}",
        dir.names()
    );
    // Its services are inside: a services' file of its own is refused.
    refused(
        &dir,
        &[
            "dev",
            "--db",
            "old.db",
            "--services-db",
            "s.db",
            "--orders",
            "1",
        ],
        "old.db keeps the services' tables inside",
    );
}

#[test]
fn a_run_killed_mid_run_is_finished_by_the_next_on_every_file() {
    let dir = Dir::new("kill");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(["dev", "--orders", "2000"])
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path("killed.err")).expect("stderr file"))
        .spawn()
        .expect("spawn sagaflow dev");
    // Kill it mid-run: once some sagas are final and others not.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && child.try_wait().expect("try_wait").is_none() {
        let listed = sagaflow(
            &dir,
            &[
                "list",
                "--state",
                "completed",
                "--limit",
                "1",
                "--format",
                "json",
            ],
        );
        let page: serde_json::Value =
            serde_json::from_slice(&listed.stdout).unwrap_or(serde_json::Value::Null);
        if page["sagas"].as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = child.try_wait().expect("try_wait");
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert!(
        ended.is_none(),
        "sagaflow dev ended ({ended:?}) before it was killed: {}",
        std::fs::read_to_string(dir.path("killed.err")).unwrap_or_default()
    );

    let t = ok(&dir, &["dev", "--orders", "0"]);
    let resumed = number_after(&t, "resuming ");
    assert!(
        resumed > 0,
        "killed mid-run, so some sagas were unfinished: {t}"
    );
    // Every saga of the database final, and every one checked against the services' tables.
    let all = number_after(&t, "all sagas in db: ");
    let line = t
        .lines()
        .find(|l| l.contains("all sagas in db: "))
        .expect("the line");
    let finals: u64 = line
        .split(['(', ')', ','])
        .filter_map(|part| {
            let (n, status) = part.trim().split_once(' ')?;
            ["completed", "compensated"]
                .contains(&status)
                .then(|| n.parse::<u64>().ok())?
        })
        .sum();
    assert_eq!(finals, all, "{t}");
    assert!(t.contains(&format!("({all} sagas checked)")), "{t}");
}

/// The number that follows `label` in `text`.
fn number_after(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in {text}"))
        + label.len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in {text}"))
}

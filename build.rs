//! Records the git commit the binary is built from, for `hearth --version`. A build
//! outside a git checkout (a packaged crate) uses `HEARTH_GIT_COMMIT` from the
//! environment when a packager sets it, else says the commit is unknown.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=HEARTH_GIT_COMMIT");
    let commit = std::env::var("HEARTH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Build again when HEAD moves: its file, the branch it names, and packed refs.
    if commit.is_some() {
        for path in ["HEAD", "packed-refs"]
            .into_iter()
            .filter_map(|p| git(&["rev-parse", "--git-path", p]))
            .chain(
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
            )
        {
            let path = PathBuf::from(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
    println!(
        "cargo:rustc-env=HEARTH_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

//! Records the git commit the binary is built from, for `hearth --version`. A build
//! outside Hearth's own git checkout (a packaged crate, even one unpacked inside some other
//! repository) uses `HEARTH_GIT_COMMIT` from the environment when a packager sets it, else
//! says the commit is unknown.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// Whether `dir` is the top of a git work tree (not a folder inside another repository).
fn is_checkout_top(dir: &Path) -> bool {
    let Some(top) = git(dir, &["rev-parse", "--show-toplevel"]) else {
        return false;
    };
    match (Path::new(&top).canonicalize(), dir.canonicalize()) {
        (Ok(top), Ok(dir)) => top == dir,
        _ => false,
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=HEARTH_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let given = std::env::var("HEARTH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty());
    let checkout = given.is_none() && is_checkout_top(&dir);
    let commit = given.or_else(|| {
        checkout
            .then(|| git(&dir, &["rev-parse", "--short=12", "HEAD"]))
            .flatten()
    });
    // In the checkout, build again when HEAD moves: its file, the branch it names, and
    // packed refs (`--git-path` answers relative to `dir` unless the git dir is
    // elsewhere). Elsewhere only this file and HEARTH_GIT_COMMIT matter.
    println!("cargo:rerun-if-changed=build.rs");
    if checkout {
        let path_of = |p: &str| git(&dir, &["rev-parse", "--git-path", p]).map(|p| dir.join(p));
        let mut watched: Vec<PathBuf> = ["HEAD", "packed-refs"]
            .into_iter()
            .filter_map(path_of)
            .filter(|p| p.exists())
            .collect();
        // A branch kept only in packed-refs gets its own file at the next commit: then
        // watch the folder it will appear in.
        if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]).and_then(|r| path_of(&r)) {
            if branch.exists() {
                watched.push(branch);
            } else if let Some(parent) = branch.parent().filter(|p| p.is_dir()) {
                watched.push(parent.to_path_buf());
            }
        }
        for path in watched {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!(
        "cargo:rustc-env=HEARTH_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

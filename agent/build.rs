//! Build facts for `syncbridge-agent version`: the git commit, the build date and the
//! compiler. Three strings from two commands do not justify a build-dependency tree
//! (vergen and friends); every fact degrades to "unknown" rather than failing the build
//! (a source tarball has no git). `SOURCE_DATE_EPOCH` makes the date reproducible.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    let commit = std::env::var("SYNCBRIDGE_GIT_COMMIT")
        .ok()
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(secs) => output(
            "date",
            &["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"],
        ),
        Err(_) => output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    }
    .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = output(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SYNCBRIDGE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=SYNCBRIDGE_BUILD_DATE={date}");
    println!("cargo:rustc-env=SYNCBRIDGE_RUSTC={rustc}");
    println!("cargo:rerun-if-env-changed=SYNCBRIDGE_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit (or checkout) changes HEAD or the ref it points to (`--git-path`
    // resolves both inside a linked worktree too).
    if let Some(head) = output("git", &["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(r) = output("git", &["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = output("git", &["rev-parse", "--git-path", &r]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

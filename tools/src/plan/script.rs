//! Runs a plan's script: `sh -c COMMAND` in the plan's directory, in a process group of its own
//! so that a timeout kills everything it started, not only the shell.

use super::file::Script;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How much of a script's output the report keeps: the end, where the error usually is.
const KEPT_OUTPUT: u64 = 64 * 1024;

pub struct ScriptRun {
    /// `Err` says why the script failed: its exit status, its signal, or the timeout.
    pub outcome: Result<(), String>,
    /// stdout and stderr as written, when captured.
    pub output: Option<String>,
}

/// Runs `script` with `environment` added; its stdout and stderr go to ours, or with
/// `capture` into the returned output.
pub fn run_script(
    script: &Script,
    directory: &Path,
    environment: &[(&str, String)],
    capture: bool,
) -> ScriptRun {
    match run(script, directory, environment, capture) {
        Ok(run) => run,
        Err(error) => ScriptRun {
            outcome: Err(format!(
                "cannot run `sh -c` in {}: {error}",
                directory.display()
            )),
            output: None,
        },
    }
}

fn run(
    script: &Script,
    directory: &Path,
    environment: &[(&str, String)],
    capture: bool,
) -> std::io::Result<ScriptRun> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&script.command)
        .current_dir(directory)
        .envs(environment.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .process_group(0);
    // An unnamed file rather than a pipe: a background process the script leaves holding its
    // output cannot keep the run waiting for the end of a pipe.
    let output_file = if capture {
        let file = tempfile::tempfile()?;
        command.stdout(file.try_clone()?).stderr(file.try_clone()?);
        Some(file)
    } else {
        None
    };
    let mut child = command.spawn()?;
    let group = child.id() as libc::pid_t;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait());
    });
    let outcome = match receiver.recv_timeout(script.timeout) {
        Ok(status) => describe_status(status?),
        Err(_) => {
            // SAFETY: kill has no memory effects; the group is the one this script leads, and
            // the shell is not reaped yet (its wait has not returned), so the id is still ours.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
            let _ = receiver.recv();
            Err(format!(
                "timed out after {}; killed",
                format_duration(script.timeout)
            ))
        }
    };
    let output = match output_file {
        Some(mut file) => Some(read_tail(&mut file)?),
        None => None,
    };
    Ok(ScriptRun { outcome, output })
}

fn describe_status(status: std::process::ExitStatus) -> Result<(), String> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(format!("exit status {code}")),
        (None, Some(signal)) => Err(format!("killed by signal {signal}")),
        (None, None) => Err(format!("ended with {status}")),
    }
}

fn read_tail(file: &mut std::fs::File) -> std::io::Result<String> {
    let length = file.seek(SeekFrom::End(0))?;
    let start = length.saturating_sub(KEPT_OUTPUT);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(if start > 0 {
        format!("[{start} bytes of earlier output left out]\n{text}")
    } else {
        text.into_owned()
    })
}

/// `60 s`, `5 min`, `500 ms`.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if duration.subsec_millis() == 0 && seconds > 60 && seconds.is_multiple_of(60) {
        format!("{} min", seconds / 60)
    } else if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(command: &str, timeout: Duration) -> Script {
        Script {
            name: "test".into(),
            command: command.into(),
            timeout,
        }
    }

    fn run_captured(command: &str, timeout: Duration) -> ScriptRun {
        let directory = tempfile::tempdir().unwrap();
        run_script(
            &script(command, timeout),
            directory.path(),
            &[("BLOCKREP_GROUP", "databases".into())],
            true,
        )
    }

    #[test]
    fn a_script_sees_the_plan_environment_and_its_output_is_captured() {
        let run = run_captured(
            "echo group $BLOCKREP_GROUP; echo oops >&2",
            Duration::from_secs(30),
        );
        assert_eq!(run.outcome, Ok(()));
        assert_eq!(run.output.as_deref(), Some("group databases\noops\n"));
    }

    #[test]
    fn a_failing_script_reports_its_exit_status() {
        let run = run_captured("exit 3", Duration::from_secs(30));
        assert_eq!(run.outcome, Err("exit status 3".into()));
    }

    #[test]
    fn a_script_past_its_timeout_is_killed_with_what_it_started() {
        let run = run_captured(
            "echo started; sleep 30; echo never",
            Duration::from_millis(300),
        );
        assert_eq!(run.outcome, Err("timed out after 300 ms; killed".into()));
        assert_eq!(run.output.as_deref(), Some("started\n"));
    }

    #[test]
    fn a_script_runs_in_the_plan_directory() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("check"), "exit 0\n").unwrap();
        let run = run_script(
            &script("sh ./check", Duration::from_secs(30)),
            directory.path(),
            &[],
            true,
        );
        assert_eq!(run.outcome, Ok(()));
    }
}

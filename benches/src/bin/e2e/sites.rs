//! The two blockrep sites of a bench line: a `blockrep serve` and a `blockrep protect` of
//! `vm1` over loopback, as daemons sharing one working directory and run directory.

use crate::Outcome;
use crate::replicate::Daemon;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Sites {
    pub(crate) blockrep: PathBuf,
    /// The working directory: the source disk, identities, the replica store.
    pub(crate) directory: PathBuf,
    /// Where the daemons put their control sockets (status is read from them).
    pub(crate) run_directory: PathBuf,
}

impl Sites {
    pub(crate) fn new(blockrep: PathBuf, directory: PathBuf) -> Outcome<Sites> {
        let run_directory = directory.join("run");
        std::fs::create_dir_all(&run_directory)?;
        // blockrep refuses a run directory others could write in.
        std::fs::set_permissions(
            &run_directory,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        Ok(Sites {
            blockrep,
            directory,
            run_directory,
        })
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    /// `blockrep serve` of `store` on `port`, once it answers on its control socket (so that
    /// no connection attempt of the primary falls before it listens and waits out a retry).
    pub(crate) fn serve(&self, port: u16, extra: &[&str]) -> Outcome<Daemon> {
        let daemon = Daemon::spawn(
            "blockrep serve",
            self.blockrep()
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store"])
                .arg(self.file("store"))
                .arg("--identity")
                .arg(self.file("replica-id"))
                .arg("--allow")
                .arg(self.file("primary-id/identity.crt"))
                .args(extra)
                .stderr(Stdio::inherit()),
        )?;
        let socket = self.run_directory.join(format!("serve-{port}.sock"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                return Err("blockrep serve did not start".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    /// `blockrep protect` of `source.raw` as `vm1`, replicating to the server on `port`.
    pub(crate) fn protect(&self, port: u16, extra: &[&str]) -> Outcome<Daemon> {
        Daemon::spawn(
            "blockrep protect",
            self.blockrep()
                .args(["protect", "--name", "vm1", "--disk"])
                .arg(self.file("source.raw"))
                .args(["--replica", &format!("127.0.0.1:{port}"), "--identity"])
                .arg(self.file("primary-id"))
                .arg("--trust")
                .arg(self.file("replica-id/identity.crt"))
                .args(extra)
                .stderr(Stdio::inherit()),
        )
    }

    /// The blockrep command, with this bench's run directory and log level (`E2E_LOG`).
    fn blockrep(&self) -> Command {
        let mut command = Command::new(&self.blockrep);
        command.env("BLOCKREP_RUN_DIR", &self.run_directory).env(
            "BLOCKREP_LOG",
            std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
        );
        command
    }
}

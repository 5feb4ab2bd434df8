//! Block-trace recording of a VM's disk: the VM record says whether the host's agent
//! should record (`vinfra vm trace start|stop`); after a stop the agent uploads the file
//! (MSR Cambridge CSV) to the blob store and it is recorded here.

use model::{BlobDigest, DesiredState, Name, ObservedState, Vm, VmTrace};
use store::StoreError;

use crate::records::{keys, now_ms, to_bytes, CAS_ATTEMPTS};
use crate::{Control, ControlError, Scope, VmChangeError};

impl Control {
    /// Starts (`recording`) or stops recording the disk of `vm` (id or name, as `scope`
    /// sees it). Starting replaces a finished trace; starting a recording one, or
    /// stopping a stopped one twice, changes nothing.
    pub async fn set_trace(
        &self,
        scope: Scope,
        vm: &str,
        recording: bool,
    ) -> Result<Vm, VmChangeError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut v, rev) = self.vm(scope, vm).await?;
            let now_recording = v.trace.as_ref().is_some_and(|t| t.recording);
            match (recording, now_recording) {
                (true, true) => return Ok(v),
                (true, false) => {
                    if v.desired != DesiredState::Running || v.observed != ObservedState::Running {
                        return Err(VmChangeError::NotRunning {
                            vm: v.name,
                            observed: v.observed,
                            desired: v.desired,
                        });
                    }
                    v.trace = Some(VmTrace {
                        recording: true,
                        started_at: now_ms(),
                        stopped_at: None,
                        blob: None,
                        size: None,
                    });
                }
                (false, false) => {
                    if v.trace.as_ref().is_some_and(|t| t.stopped_at.is_some()) {
                        return Ok(v);
                    }
                    return Err(VmChangeError::NotRecording(v.name));
                }
                (false, true) => {
                    if let Some(t) = v.trace.as_mut() {
                        t.recording = false;
                        t.stopped_at = Some(now_ms());
                    }
                }
            }
            match self
                .store()
                .cas(&keys::vm(v.id), Some(rev), to_bytes(&v)?)
                .await
            {
                Ok(_) => {
                    tracing::info!(vm = %v.name, recording, "trace recording changed");
                    return Ok(v);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {vm}"),
        }
        .into())
    }

    /// The agent of `host` stored the stopped trace of `vm` (its id) as `blob`.
    pub async fn trace_uploaded(
        &self,
        vm: &str,
        host: &Name,
        blob: BlobDigest,
        size: u64,
    ) -> Result<Vm, VmChangeError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut v, rev) = self.vm(Scope::All, vm).await?;
            if v.host != *host {
                return Err(VmChangeError::WrongHost {
                    vm: v.id,
                    assigned: v.host,
                    reporter: host.clone(),
                });
            }
            let Some(t) = v
                .trace
                .as_mut()
                .filter(|t| !t.recording && t.blob.is_none())
            else {
                return Err(VmChangeError::NoTraceAwaited(v.id));
            };
            t.blob = Some(blob.clone());
            t.size = Some(size);
            match self
                .store()
                .cas(&keys::vm(v.id), Some(rev), to_bytes(&v)?)
                .await
            {
                Ok(_) => return Ok(v),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {vm}"),
        }
        .into())
    }
}

//! The sink behind the serial port: passes guest console output to the
//! user's chosen writer and watches it, line by line, for a kernel panic.
//!
//! Without ACPI or pvpanic there is no device through which the kernel says
//! it panicked, but it always prints "Kernel panic - not syncing" to the
//! console before it reboots (panic=-1) or halts (panic=0). The guest is
//! untrusted: a process that prints that line can only make its own VM report
//! a panic, which is no worse than crashing it.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use crate::devices::{EventSender, VmEvent};

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const PANIC_END_MARKER: &str = "---[ end Kernel panic";
/// Longest console line kept for panic matching; the rest is passed through.
const MAX_LINE: usize = 1024;

/// Shared record of a panic seen on the console.
#[derive(Clone, Default)]
pub struct PanicWatch(Arc<Mutex<Option<String>>>);

impl PanicWatch {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap().clone()
    }
}

pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    watch: PanicWatch,
    events: EventSender,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, events: EventSender) -> Self {
        ConsoleSink { out, line: Vec::new(), watch: PanicWatch::default(), events }
    }

    pub fn watch(&self) -> PanicWatch {
        self.watch.clone()
    }

    fn end_of_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        // The end line repeats the marker, so look for it first.
        if text.contains(PANIC_END_MARKER) {
            // panic=0: the kernel will now spin forever, so end the VM here.
            let msg = self.watch.get().unwrap_or_else(|| text.trim_end().to_string());
            let _ = self.events.send(VmEvent::Panic(msg));
        } else if let Some(pos) = text.find(PANIC_MARKER) {
            let mut seen = self.watch.0.lock().unwrap();
            if seen.is_none() {
                *seen = Some(text[pos..].trim_end().to_string());
            }
        }
        self.line.clear();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        // Console output must never stall or kill a vCPU: a closed pipe
        // (the reader went away) just drops the bytes.
        if let Err(e) = self.out.write_all(buf) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn passes_output_through_and_records_panic() {
        let (tx, rx) = channel();
        let out = Shared::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone()), tx);
        let watch = sink.watch();
        sink.write_all(b"[    0.5] Run /init as init process\n").unwrap();
        assert_eq!(watch.get(), None);
        sink.write_all(b"[    0.6] Kernel panic - not syncing: No working init found.\r\n").unwrap();
        assert_eq!(watch.get().as_deref(), Some("Kernel panic - not syncing: No working init found."));
        assert!(rx.try_recv().is_err(), "panic=-1 ends through the reset that follows");
        sink.write_all(b"---[ end Kernel panic - not syncing: No working init found. ]---\n").unwrap();
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Panic("Kernel panic - not syncing: No working init found.".into()));
        assert!(String::from_utf8(out.0.lock().unwrap().clone()).unwrap().contains("Run /init"));
    }

    #[test]
    fn long_lines_are_bounded() {
        let (tx, _rx) = channel();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), tx);
        sink.write_all(&vec![b'a'; 100_000]).unwrap();
        assert!(sink.line.len() <= MAX_LINE);
    }
}

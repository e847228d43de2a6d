//! `hog MIB`: allocates MIB mebibytes and keeps them, so that a container
//! with a smaller memory limit gets OOM-killed by its cgroup. Prints
//! `hog: N MiB` every 8 MiB and `hog: done` if it got them all, then lingers
//! a second (long enough for a late OOM kill to still land) and exits 0.

use std::io::Write;
use std::time::Duration;

const MIB: usize = 1 << 20;
/// Writing one byte every 4 KiB touches every page whatever the page size
/// (4 KiB or more).
const TOUCH_STRIDE: usize = 4096;

pub fn run(mib: usize) -> std::io::Result<()> {
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(mib);
    let mut out = std::io::stdout().lock();
    for n in 1..=mib {
        // A zeroed MiB comes from calloc/mmap as untouched zero pages, which
        // the memory cgroup does not charge until they are written: dirty
        // every one of them.
        let mut chunk = vec![0u8; MIB];
        for b in chunk.iter_mut().step_by(TOUCH_STRIDE) {
            *b = 1;
        }
        // Keeps the compiler from proving the writes dead and dropping them.
        held.push(std::hint::black_box(chunk));
        if n % 8 == 0 {
            writeln!(out, "hog: {n} MiB")?;
            out.flush()?;
        }
    }
    writeln!(out, "hog: done")?;
    out.flush()?;
    std::thread::sleep(Duration::from_secs(1));
    drop(held);
    Ok(())
}

//! COM1: a 16550A UART at [`COM1_PORT`], the guest's serial console.
//!
//! The data path and most registers are `vm-superio`'s [`Serial`] (transmit, the 64-byte
//! receive FIFO, divisor latch, line and modem control, loopback); this file adapts it to the
//! port bus (absolute ports, any access width split into byte accesses as the ISA bus would)
//! and owns the interrupt: the interrupt identification register and the level of
//! [`COM1_GSI`].
//!
//! The interrupt follows a real 16550 (and QEMU's serial): the UART's interrupt output is a
//! *level* that stays asserted while an enabled condition holds — received data is waiting
//! (`IER.RDI` and `LSR.DR`) or the transmitter is empty and that has not been acknowledged
//! (`IER.THRI`, cleared by an `IIR` read that reports it, set again by the next `THR` write
//! or by enabling `THRI`). `IIR` reports the highest-priority condition that holds now. The
//! line to the interrupt controller changes only when that level does: on a PC, IRQ 4 is
//! edge-triggered at the IOAPIC, so the guest sees one edge each time the level rises, and
//! Linux's 8250 driver, which reads `IIR` until it says "no interrupt" before it returns,
//! lowers the level on its way out so that the next condition raises a new edge.
//!
//! `vm-superio` 0.8 pulses its interrupt on every new condition instead and clears
//! "received data" on any `RBR` or `IIR` read, even with bytes left in the FIFO. A guest that
//! stopped reading with bytes left (Linux reads at most 256 characters per pass while the
//! console thread refills the FIFO) then read `IIR` as "no interrupt" and never heard of those
//! bytes again: console input stalled after a few KiB.
//!
//! Not modelled: line status errors (`IER.RLSI` never fires), modem status changes
//! (`IER.MSI` never fires), receive trigger levels and the character timeout (received data
//! interrupts as soon as one byte is waiting), `MCR.OUT2` gating the line (as QEMU).

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};

use super::access::byte_port;
use super::{PioDevice, Platform};
use crate::layout::{COM1_GSI, COM1_PORT};

/// Ports the UART decodes, from [`COM1_PORT`].
const REGISTER_COUNT: u16 = 8;

/// Register offsets.
const THR_RBR: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
/// Bytes the receive FIFO holds (`vm-superio`'s).
const FIFO_BYTES: usize = 64;
/// `IER` bits this UART acts on, and the bits a guest may set.
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_VALID: u8 = 0x0f;
/// `IIR` values: the interrupt identification (highest priority first) with the FIFO-enabled
/// bits a 16550A reports.
const IIR_FIFO_BITS: u8 = 0xc0;
const IIR_NO_INT: u8 = 0x01;
const IIR_RDI: u8 = 0x04;
const IIR_THRI: u8 = 0x02;
/// `LCR.DLAB`: offsets 0 and 1 are the divisor latch.
const LCR_DLAB: u8 = 0x80;
/// `LSR.DR`: received data is waiting.
const LSR_DR: u8 = 0x01;

/// `vm-superio`'s interrupt callback, unused: [`Com1`] derives its line from the registers.
struct NoPulse;

impl Trigger for NoPulse {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The COM1 UART: guest output goes to the writer given at creation, input comes from
/// [`Com1::enqueue_input`].
pub struct Com1 {
    uart: Serial<NoPulse, NoEvents, Box<dyn Write + Send>>,
    platform: Arc<dyn Platform>,
    /// `IER` as the guest last wrote it (`vm-superio` keeps it too, unreadable behind DLAB).
    ier: u8,
    /// The transmitter-empty interrupt is pending (not yet acknowledged by an `IIR` read).
    thr_pending: bool,
    /// The level [`COM1_GSI`] was last driven to.
    line: bool,
    /// When the guest last read or wrote a register.
    last_access: Instant,
}

impl std::fmt::Debug for Com1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Com1")
            .field("ier", &self.ier)
            .field("thr_pending", &self.thr_pending)
            .field("line", &self.line)
            .field("fifo_capacity", &self.uart.fifo_capacity())
            .finish_non_exhaustive()
    }
}

impl Com1 {
    /// A UART in its reset state that drives [`COM1_GSI`] on `platform` and writes the
    /// guest's output to `out`.
    pub fn new(platform: Arc<dyn Platform>, out: Box<dyn Write + Send>) -> Com1 {
        Com1 {
            uart: Serial::new(NoPulse, out),
            platform,
            ier: 0,
            thr_pending: false,
            line: false,
            last_access: Instant::now(),
        }
    }

    /// The UART's state when input has waited in the receive FIFO for `idle` or longer with
    /// no guest access at all, for a log line; `None` otherwise. Reads nothing that a guest
    /// read would change.
    pub fn stalled_input(&mut self, idle: Duration) -> Option<String> {
        let waiting = FIFO_BYTES.saturating_sub(self.uart.fifo_capacity());
        if waiting == 0 || self.last_access.elapsed() < idle {
            return None;
        }
        let iir = IIR_FIFO_BITS | self.identification();
        let (lsr, mcr) = (self.uart.read(LSR), self.uart.read(MCR));
        Some(format!(
            "{waiting} input bytes unread for {} ms: IER={:#04x} IIR={iir:#04x} LSR={lsr:#04x} \
             MCR={mcr:#04x} line={}",
            self.last_access.elapsed().as_millis(),
            self.ier,
            if self.line { "high" } else { "low" },
        ))
    }

    /// Puts `bytes` into the receive FIFO for the guest to read and returns how many fit; the
    /// caller offers the rest again once the guest has drained some. A UART in loopback mode
    /// accepts nothing.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let accepted = match self.uart.enqueue_raw_bytes(bytes) {
            Ok(accepted) => accepted,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "com1: input not queued");
                0
            }
        };
        self.update_line();
        accepted
    }

    /// The register offset of `port`, if the UART decodes it.
    fn offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_PORT)
            .filter(|&o| o < REGISTER_COUNT)
            .and_then(|o| u8::try_from(o).ok())
    }

    /// Whether offsets 0 and 1 are the divisor latch now.
    fn dlab(&mut self) -> bool {
        self.uart.read(LCR) & LCR_DLAB != 0
    }

    /// The highest-priority pending interrupt as `IIR`'s identification bits.
    fn identification(&mut self) -> u8 {
        if self.ier & IER_RDI != 0 && self.uart.read(LSR) & LSR_DR != 0 {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI
        } else {
            IIR_NO_INT
        }
    }

    /// Drives [`COM1_GSI`] to the interrupt output's level, if that changed.
    fn update_line(&mut self) {
        let level = self.identification() != IIR_NO_INT;
        if level != self.line {
            self.line = level;
            self.platform.set_irq(COM1_GSI, level);
        }
    }

    fn read_register(&mut self, offset: u8) -> u8 {
        if offset == IIR {
            let id = self.identification();
            // Reading IIR acknowledges a transmitter-empty interrupt it reports; received
            // data stays pending until the FIFO is drained.
            if id == IIR_THRI {
                self.thr_pending = false;
            }
            return IIR_FIFO_BITS | id;
        }
        self.uart.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        let dlab = self.dlab();
        if let Err(e) = self.uart.write(offset, value) {
            // The byte is lost; the guest is not told (a real UART's line would not be).
            tracing::debug!(error = %e, "com1: output byte dropped");
        }
        match offset {
            // Transmission is instantaneous: the holding register is empty again at once.
            THR_RBR if !dlab => self.thr_pending = true,
            IER if !dlab => {
                let value = value & IER_VALID;
                if (self.ier ^ value) & IER_THRI != 0 {
                    // Enabling THRI with the transmitter empty (it always is) interrupts;
                    // disabling it drops a pending one.
                    self.thr_pending = value & IER_THRI != 0;
                }
                self.ier = value;
            }
            _ => {}
        }
    }
}

impl PioDevice for Com1 {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        self.last_access = Instant::now();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = if let Some(offset) = byte_port(port, i).and_then(Self::offset) {
                self.read_register(offset)
            } else {
                tracing::debug!(port, "com1: read outside the UART");
                0xff
            };
        }
        self.update_line();
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        self.last_access = Instant::now();
        for (i, &value) in data.iter().enumerate() {
            let Some(offset) = byte_port(port, i).and_then(Self::offset) else {
                tracing::debug!(port, value, "com1: write outside the UART dropped");
                continue;
            };
            self.write_register(offset, value);
        }
        self.update_line();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::fake_platform::RecordingPlatform;

    const RBR_THR: u16 = COM1_PORT;
    const IER_PORT: u16 = COM1_PORT + 1;
    const IIR_PORT: u16 = COM1_PORT + 2;
    const LCR_PORT: u16 = COM1_PORT + 3;
    const LSR_PORT: u16 = COM1_PORT + 5;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RX: u8 = 0x01;
    const IER_TX: u8 = 0x02;
    /// `IIR` as a 16550A with FIFOs reports each condition.
    const IIR_RX: u8 = 0xc4;
    const IIR_TX: u8 = 0xc2;
    const IIR_NONE: u8 = 0xc1;

    /// A writer the test can look into after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose every write fails.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("broken"))
        }
    }

    fn com1() -> (Com1, Arc<RecordingPlatform>, SharedBuf) {
        let platform = Arc::new(RecordingPlatform::default());
        let out = SharedBuf::default();
        let com1 = Com1::new(platform.clone(), Box::new(out.clone()));
        (com1, platform, out)
    }

    fn inb(com1: &mut Com1, port: u16) -> u8 {
        let mut b = [0u8; 1];
        com1.read(port, &mut b);
        b[0]
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let (mut com1, _, out) = com1();
        for &b in b"hi\n" {
            com1.write(RBR_THR, &[b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn enqueued_input_is_read_from_rbr_with_data_ready_until_drained() {
        let (mut com1, _, _) = com1();
        assert_eq!(com1.enqueue_input(b"ok"), 2);
        assert_ne!(inb(&mut com1, LSR_PORT) & LSR_DATA_READY, 0);
        assert_eq!(inb(&mut com1, RBR_THR), b'o');
        assert_eq!(inb(&mut com1, RBR_THR), b'k');
        assert_eq!(inb(&mut com1, LSR_PORT) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_with_rx_interrupt_enabled_raises_com1_gsi_until_the_fifo_is_drained() {
        let (mut com1, platform, _) = com1();
        com1.write(IER_PORT, &[IER_RX]);
        assert!(platform.irqs().is_empty());
        com1.enqueue_input(b"xy");
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true)]);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_RX);
        assert_eq!(inb(&mut com1, RBR_THR), b'x');
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true)], "a byte is left");
        assert_eq!(inb(&mut com1, RBR_THR), b'y');
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true), (COM1_GSI, false)]);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_NONE);
    }

    /// The console stall: Linux's 8250 driver reads at most 256 characters per pass while the
    /// console thread refills the FIFO, then reads IIR to decide whether to go round again.
    /// With bytes left, IIR must still say "received data", and the line must stay up.
    #[test]
    fn received_data_stays_pending_after_iir_and_partial_rbr_reads() {
        let (mut com1, platform, _) = com1();
        com1.write(IER_PORT, &[IER_RX]);
        com1.enqueue_input(b"abcdef");
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_RX);
        assert_eq!(inb(&mut com1, RBR_THR), b'a');
        com1.enqueue_input(b"g");
        assert_eq!(inb(&mut com1, RBR_THR), b'b');

        assert_eq!(inb(&mut com1, IIR_PORT), IIR_RX);
        assert_eq!(
            inb(&mut com1, IIR_PORT),
            IIR_RX,
            "reading IIR acknowledges no data"
        );
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true)]);
        for &want in b"cdefg" {
            assert_eq!(inb(&mut com1, RBR_THR), want);
        }
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_NONE);
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true), (COM1_GSI, false)]);
    }

    #[test]
    fn enabling_rx_interrupts_with_data_waiting_raises_the_line() {
        let (mut com1, platform, _) = com1();
        com1.enqueue_input(b"z");
        assert!(platform.irqs().is_empty());
        com1.write(IER_PORT, &[IER_RX]);
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true)]);
        com1.write(IER_PORT, &[0]);
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true), (COM1_GSI, false)]);
    }

    #[test]
    fn thr_empty_interrupts_on_enable_and_after_each_write_until_iir_acknowledges_it() {
        let (mut com1, platform, out) = com1();
        com1.write(IER_PORT, &[IER_TX]);
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true)]);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_TX);
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true), (COM1_GSI, false)]);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_NONE);

        com1.write(RBR_THR, b"q");
        assert_eq!(*out.0.lock().unwrap(), b"q");
        assert_eq!(platform.irqs().last(), Some(&(COM1_GSI, true)));
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_TX);
        assert_eq!(platform.irqs().last(), Some(&(COM1_GSI, false)));
        assert_eq!(platform.irqs().len(), 4);
    }

    /// Linux's startup test for UARTs that do not re-assert THRE (`UART_BUG_THRE`): enable
    /// THRI, read IIR, disable, enable again, read IIR; a real 16550 reports THRE both times.
    #[test]
    fn thr_empty_is_reasserted_when_thri_is_enabled_again() {
        let (mut com1, _, _) = com1();
        com1.write(IER_PORT, &[IER_TX]);
        let first = inb(&mut com1, IIR_PORT);
        com1.write(IER_PORT, &[0]);
        com1.write(IER_PORT, &[IER_TX]);
        let second = inb(&mut com1, IIR_PORT);
        assert_eq!((first, second), (IIR_TX, IIR_TX));
    }

    #[test]
    fn received_data_is_reported_before_thr_empty() {
        let (mut com1, _, _) = com1();
        com1.write(IER_PORT, &[IER_RX | IER_TX]);
        com1.enqueue_input(b"r");
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_RX);
        assert_eq!(inb(&mut com1, RBR_THR), b'r');
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_TX);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_NONE);
    }

    #[test]
    fn ier_writes_behind_the_divisor_latch_set_the_divisor_not_the_interrupts() {
        let (mut com1, platform, _) = com1();
        com1.write(LCR_PORT, &[0x80]);
        com1.write(IER_PORT, &[IER_TX]);
        com1.write(RBR_THR, &[0x01]);
        assert!(platform.irqs().is_empty());
        com1.write(LCR_PORT, &[0x03]);
        assert_eq!(inb(&mut com1, IER_PORT), 0);
        assert_eq!(inb(&mut com1, IIR_PORT), IIR_NONE);
    }

    #[test]
    fn input_left_unread_is_reported_with_the_registers_and_an_access_clears_the_report() {
        let (mut com1, _platform, _out) = com1();
        com1.write(IER_PORT, &[IER_RX]);
        assert_eq!(com1.enqueue_input(b"abc"), 3);
        std::thread::sleep(Duration::from_millis(30));
        let report = com1
            .stalled_input(Duration::from_millis(20))
            .expect("a report");
        assert!(report.starts_with("3 input bytes unread for "), "{report}");
        assert!(report.contains("IER=0x01 IIR=0xc4 LSR=0x61"), "{report}");
        assert!(report.contains("line=high"), "{report}");
        // Nothing was read: the FIFO still holds all three bytes.
        assert_eq!(inb(&mut com1, RBR_THR), b'a');
        assert!(com1.stalled_input(Duration::from_millis(20)).is_none());
    }

    #[test]
    fn input_with_interrupts_disabled_raises_nothing() {
        let (mut com1, platform, _) = com1();
        com1.enqueue_input(b"x");
        assert!(platform.irqs().is_empty());
    }

    #[test]
    fn full_fifo_accepts_only_what_fits() {
        let (mut com1, _, _) = com1();
        let many = [b'a'; 100];
        let first = com1.enqueue_input(&many);
        assert!(first < many.len());
        assert!(first > 0);
        assert_eq!(com1.enqueue_input(&many), 0);
        inb(&mut com1, RBR_THR);
        assert_eq!(com1.enqueue_input(&many), 1);
    }

    #[test]
    fn wide_access_is_split_into_byte_registers() {
        let (mut com1, _, out) = com1();
        // A 2-byte write at THR: 'A' to THR, 0 to IER.
        com1.write(RBR_THR, &[b'A', 0]);
        assert_eq!(*out.0.lock().unwrap(), b"A");
        // Scratch register (offset 7) round-trips; a 4-byte read from offset 6 runs off the end.
        com1.write(COM1_PORT + 7, &[0x5a]);
        let mut w = [0u8; 4];
        com1.read(COM1_PORT + 6, &mut w);
        assert_eq!(&w[1..], &[0x5a, 0xff, 0xff]);
    }

    #[test]
    fn ports_outside_the_uart_read_all_ones_and_drop_writes() {
        let (mut com1, _, out) = com1();
        assert_eq!(inb(&mut com1, COM1_PORT - 1), 0xff);
        assert_eq!(inb(&mut com1, u16::MAX), 0xff);
        com1.write(0, b"z");
        let mut w = [0u8; 4];
        com1.read(u16::MAX - 1, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn failing_output_drops_the_byte_without_panicking() {
        let platform = Arc::new(RecordingPlatform::default());
        let mut com1 = Com1::new(platform, Box::new(Broken));
        com1.write(RBR_THR, b"lost");
        assert_eq!(
            inb(&mut com1, LSR_PORT) & 0x60,
            0x60,
            "transmitter still reads empty"
        );
    }
}

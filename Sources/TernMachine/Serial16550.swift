import Synchronization

/// A 16550A UART (COM1 at 0x3F8, IRQ 4): enough of the chip for Linux's
/// 8250 driver and for polling guests. Transmission is instantaneous, so the
/// transmitter is always empty; received bytes wait in a 16-byte FIFO.
public final class Serial16550: PortIODevice {
    public static let com1Base: UInt16 = 0x3F8
    public static let com1IRQ: UInt32 = 4
    public static let fifoCapacity = 16

    /// The UART's registers and FIFO: everything needed to resume it elsewhere.
    public struct State: Codable, Equatable, Sendable {
        public static let version: UInt32 = 1
        public var divisorLow: UInt8 = 0x0C     // 9600 baud
        public var divisorHigh: UInt8 = 0
        public var interruptEnable: UInt8 = 0
        public var fifoControl: UInt8 = 0
        public var lineControl: UInt8 = 0x03    // 8N1
        public var modemControl: UInt8 = 0x08   // OUT2
        public var scratch: UInt8 = 0
        /// A THR-empty interrupt is owed to the guest (cleared by reading IIR or writing THR).
        public var transmitInterruptPending = false
        public var receiveFIFO: [UInt8] = []
        public init() {}
    }

    private let state = Mutex(State())
    private let connection: any SerialConnection
    /// Drives the IRQ line (level) of the in-kernel interrupt controller.
    private let interruptLine: @Sendable (Bool) -> Void

    public init(connection: any SerialConnection, interruptLine: @escaping @Sendable (Bool) -> Void = { _ in }) {
        self.connection = connection
        self.interruptLine = interruptLine
    }

    public func start() {
        connection.startReceiving { [weak self] bytes in self?.receive(bytes) }
    }

    public func snapshot() -> State { state.withLock { $0 } }

    public func restore(_ newState: State) {
        let level = state.withLock { current -> Bool in
            current = newState
            return Self.interruptAsserted(current)
        }
        interruptLine(level)
    }

    /// Bytes arriving from outside (a socket client typing).
    public func receive(_ bytes: [UInt8]) {
        let level = state.withLock { s -> Bool in
            for byte in bytes where s.receiveFIFO.count < Self.fifoCapacity { s.receiveFIFO.append(byte) }
            return Self.interruptAsserted(s)
        }
        interruptLine(level)
    }

    private static let dlab: UInt8 = 0x80
    private static let loopback: UInt8 = 0x10

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        let (value, level) = state.withLock { s -> (UInt8, Bool) in
            let value: UInt8
            switch offset {
            case 0 where s.lineControl & Self.dlab != 0: value = s.divisorLow
            case 0: value = s.receiveFIFO.isEmpty ? 0 : s.receiveFIFO.removeFirst()
            case 1 where s.lineControl & Self.dlab != 0: value = s.divisorHigh
            case 1: value = s.interruptEnable
            case 2:
                value = Self.interruptIdentification(s)
                // Reading IIR while it reports THR-empty acknowledges it.
                if value & 0x0F == 0x02 { s.transmitInterruptPending = false }
            case 3: value = s.lineControl
            case 4: value = s.modemControl
            case 5: value = 0x60 | (s.receiveFIFO.isEmpty ? 0 : 0x01) // THRE | TEMT | DR
            case 6:
                // Modem status: in loopback the outputs feed back; otherwise report a live line.
                value = s.modemControl & Self.loopback != 0 ? (s.modemControl & 0x0F) << 4 : 0xB0
            case 7: value = s.scratch
            default: value = 0xFF
            }
            return (value, Self.interruptAsserted(s))
        }
        data[0] = value
        for i in data.indices.dropFirst() { data[i] = 0 }
        interruptLine(level)
    }

    public func write(offset: UInt16, from data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        var transmitted: UInt8?
        let level = state.withLock { s -> Bool in
            switch offset {
            case 0 where s.lineControl & Self.dlab != 0: s.divisorLow = value
            case 0:
                if s.modemControl & Self.loopback != 0 {
                    if s.receiveFIFO.count < Self.fifoCapacity { s.receiveFIFO.append(value) }
                } else {
                    transmitted = value
                }
                s.transmitInterruptPending = true
            case 1 where s.lineControl & Self.dlab != 0: s.divisorHigh = value
            case 1:
                // Enabling the THR-empty interrupt raises it at once: the transmitter is empty.
                if value & 0x02 != 0 && s.interruptEnable & 0x02 == 0 { s.transmitInterruptPending = true }
                s.interruptEnable = value & 0x0F
            case 2:
                s.fifoControl = value
                if value & 0x02 != 0 { s.receiveFIFO.removeAll() }
            case 3: s.lineControl = value
            case 4: s.modemControl = value & 0x1F
            case 7: s.scratch = value
            default: break
            }
            return Self.interruptAsserted(s)
        }
        if let transmitted { connection.transmit(transmitted) }
        interruptLine(level)
    }

    private static func interruptIdentification(_ s: State) -> UInt8 {
        let fifoBits: UInt8 = s.fifoControl & 0x01 != 0 ? 0xC0 : 0
        if s.interruptEnable & 0x01 != 0 && !s.receiveFIFO.isEmpty { return fifoBits | 0x04 }
        if s.interruptEnable & 0x02 != 0 && s.transmitInterruptPending { return fifoBits | 0x02 }
        return fifoBits | 0x01
    }

    private static func interruptAsserted(_ s: State) -> Bool {
        // OUT2 gates the interrupt line to the PIC on PC-compatible boards.
        interruptIdentification(s) & 0x01 == 0 && s.modemControl & 0x08 != 0
    }

    public func close() { connection.close() }
}

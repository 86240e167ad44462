/// The keyboard controller, reduced to what a headless VM needs: the reset
/// line (command 0xFE on port 0x64), which guests use to reboot.
public final class I8042: PortIODevice {
    public static let dataPort: UInt16 = 0x60
    public static let commandPort: UInt16 = 0x64
    static let resetCommand: UInt8 = 0xFE

    private let onReset: @Sendable () -> Void

    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        for i in data.indices { data[i] = 0 }
    }

    public func write(offset: UInt16, from data: UnsafeRawBufferPointer) {
        // Attached at 0x60 with a span of 5 ports: offset 4 is the command port.
        if offset == 4, data.first == Self.resetCommand { onReset() }
    }
}

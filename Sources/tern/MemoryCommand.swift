import ArgumentParser
import Foundation
import TernAPI

struct Memory: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Inspect guest memory (debugging).", subcommands: [Read.self])

    struct Read: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Read guest-physical memory: a hex dump, or raw bytes with --out.")
        @OptionGroup var api: APIOptions

        @Option(help: "Guest-physical address (decimal or 0x-hex).")
        var addr: String

        @Option(help: "Number of bytes to read.")
        var length: String

        @Option(help: "Write the raw bytes to FILE, or to stdout with '-'.")
        var out: String?

        func validate() throws {
            guard APIRouter.parseInteger(addr) != nil else { throw ValidationError("--addr '\(addr)' is not a number") }
            guard let n = APIRouter.parseInteger(length), n > 0 else { throw ValidationError("--length must be a positive number") }
        }

        func run() throws {
            let response = try call(api.client, .GET, "/v1/vm/memory?address=\(addr)&length=\(length)", expecting: 200)
            switch out {
            case "-":
                FileHandle.standardOutput.write(response.body)
            case let path?:
                guard FileManager.default.createFile(atPath: path, contents: response.body) else { fail("cannot write \(path)") }
            case nil:
                print(HexDump.render(response.body, baseAddress: APIRouter.parseInteger(addr)!))
            }
        }
    }
}

enum HexDump {
    /// `xxd`-style lines: address, 16 bytes in hex, printable ASCII.
    static func render(_ data: Data, baseAddress: UInt64) -> String {
        let bytes = [UInt8](data)
        var lines: [String] = []
        for start in stride(from: 0, to: bytes.count, by: 16) {
            let chunk = bytes[start..<min(start + 16, bytes.count)]
            let hex = chunk.map { String(format: "%02x", $0) }.joined(separator: " ")
            let ascii = String(chunk.map { (0x20..<0x7F).contains($0) ? Character(UnicodeScalar($0)) : "." })
            lines.append(String(format: "%016llx  ", baseAddress + UInt64(start)) + hex.padding(toLength: 47, withPad: " ", startingAt: 0) + "  " + ascii)
        }
        return lines.joined(separator: "\n")
    }
}

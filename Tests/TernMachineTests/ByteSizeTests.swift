import Testing
import TernMachine

struct ByteSizeTests {
    @Test(arguments: [
        ("512M", UInt64(512) << 20), ("2G", UInt64(2) << 30), ("16MiB", UInt64(16) << 20), ("1048576", UInt64(1 << 20)),
        ("4k", UInt64(4096)), (" 8G ", UInt64(8) << 30), ("1T", UInt64(1) << 40), ("64mb", UInt64(64) << 20),
    ])
    func parsesSizes(text: String, bytes: UInt64) throws {
        #expect(try ByteSize(parsing: text).bytes == bytes)
    }

    @Test(arguments: ["", "M", "12X", "1.5G", "-1G", "0x10M", "G2", "99999999999999999999", "99999999999T"])
    func rejectsMalformedSizes(text: String) {
        #expect(throws: ByteSize.ParseError.self) { try ByteSize(parsing: text) }
    }

    @Test func describesInLargestExactUnit() {
        #expect(ByteSize(bytes: 1 << 30).description == "1G")
        #expect(ByteSize(bytes: 1536 << 20).description == "1536M")
        #expect(ByteSize(bytes: 1000).description == "1000")
    }

    @Test func errorMessageNamesTheInput() {
        do { _ = try ByteSize(parsing: "12X") } catch {
            #expect(error.description.contains("'12X'"))
        }
    }
}

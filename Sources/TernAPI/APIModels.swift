import Foundation
import TernMachine

/// The one error shape every API route returns: `{"error": {"code", "message"}}`.
public struct APIErrorBody: Codable, Equatable, Sendable {
    public struct Detail: Codable, Equatable, Sendable {
        public var code: String
        public var message: String
    }
    public var error: Detail

    public init(code: String, message: String) {
        error = Detail(code: code, message: message)
    }
}

/// A response before it is put on the wire: status, content type, body.
public struct APIResponse: Sendable {
    public var status: Int
    public var contentType: String?
    public var body: Data
    /// Runs after the response has been written (used by quit, so the
    /// client hears back before the VM goes away).
    public var afterSending: (@Sendable () -> Void)?
    /// Further headers (e.g. the Allow of a 405).
    public var headers: [(name: String, value: String)] = []

    public init(status: Int, contentType: String?, body: Data, afterSending: (@Sendable () -> Void)? = nil,
                headers: [(name: String, value: String)] = []) {
        self.status = status
        self.contentType = contentType
        self.body = body
        self.afterSending = afterSending
        self.headers = headers
    }

    /// 202: the request was taken, and goes on after this answer.
    public static var accepted: APIResponse { APIResponse(status: 202, contentType: nil, body: Data()) }

    public static func json(_ value: some Encodable, status: Int = 200) -> APIResponse {
        APIResponse(status: status, contentType: "application/json", body: (try? APIJSON.encoder.encode(value)) ?? Data())
    }

    public static func error(_ status: Int, _ code: String, _ message: String) -> APIResponse {
        json(APIErrorBody(code: code, message: message), status: status)
    }

    public static func noContent(afterSending: (@Sendable () -> Void)? = nil) -> APIResponse {
        APIResponse(status: 204, contentType: nil, body: Data(), afterSending: afterSending)
    }
}

/// JSON conventions of the API: snake_case keys, sorted for stable output.
public enum APIJSON {
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return encoder
    }()

    public static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }()
}

/// Body of PUT /v1/vm/snapshot.
public struct SnapshotRequest: Codable, Sendable {
    public var path: String
    public var resume: Bool?

    public init(path: String, resume: Bool?) {
        self.path = path
        self.resume = resume
    }
}

import type { FastifyLoggerOptions, FastifyReply, FastifyRequest, FastifyServerOptions } from 'fastify';
import { LogController } from 'fastify';
import type { DestinationStream } from 'pino';
import pretty from 'pino-pretty';

/** One line per request, when it completes, with the request id, the path and the outcome. */
class RequestLog extends LogController {
  override incomingRequest() {}
  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply) {
    const line = { req: request, res: reply, responseTime: reply.elapsedTime };
    if (error) reply.log.error({ ...line, err: error }, 'request errored');
    else reply.log.info(line, 'request completed');
  }
}

export interface LogSettings {
  LOG_LEVEL: string;
  /** `json` (default): one JSON object per line, for machines. `pretty`: pino-pretty, for a terminal. */
  LOG_FORMAT: 'json' | 'pretty';
}

/**
 * A server's logging, for `Fastify({ ...logging(name, config, serializers) })`: one line per request
 * (when it completes), at `LOG_LEVEL`, as JSON lines or, with `LOG_FORMAT=pretty`, pino-pretty's
 * readable lines. `serializers.req` decides what of a request is written (B redacts tokens).
 * JSON lines go to `stream` when one is given (B's buffered stdout), else to stdout.
 */
export function logging(
  name: string,
  settings: LogSettings,
  serializers: FastifyLoggerOptions['serializers'],
  stream?: DestinationStream,
): Pick<FastifyServerOptions, 'logger' | 'logController'> {
  return {
    logger: {
      name,
      level: settings.LOG_LEVEL,
      serializers,
      // One line per entry, the request's method, path and status first. Synchronous, like
      // pino's default destination: nothing is lost when the process exits.
      ...(stream && { stream }),
      ...(settings.LOG_FORMAT === 'pretty' && {
        stream: pretty({
          sync: true,
          singleLine: true,
          ignore: 'hostname,req,res',
          messageFormat: '{if req.method}{req.method} {req.url} {res.statusCode} {end}{msg}',
        }),
      }),
    },
    logController: new RequestLog(),
  };
}

import type { FastifyLoggerOptions, FastifyReply, FastifyRequest, FastifyServerOptions } from 'fastify';
import { LogController } from 'fastify';
import type { DestinationStream } from 'pino';
import pretty from 'pino-pretty';

/** What a request's one log line says about an answer that is not a success. */
export interface Outcome {
  /** The catalogue code the client got. */
  code: string;
  /** `info` for a refusal the client caused, `warn` or `error` for the server's own trouble. */
  level: 'info' | 'warn' | 'error';
  /** The cause, for the server's own trouble (its stack reaches the log, never the client). */
  err?: unknown;
  /** Why the request was refused, in words (a validation message), for refusals. */
  reason?: string;
}

const outcomes = new WeakMap<FastifyReply, Outcome>();

/**
 * Puts the refusal's code (and its level and cause) into the line this request writes when it
 * completes, instead of a line of its own: one line per request, whatever its outcome.
 */
export function logOutcome(reply: FastifyReply, outcome: Outcome): void {
  outcomes.set(reply, outcome);
}

/** One line per request, when it completes, with the request id, the path and the outcome. */
class RequestLog extends LogController {
  override incomingRequest() {}
  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply) {
    const outcome = outcomes.get(reply);
    const line = {
      req: request,
      res: reply,
      responseTime: reply.elapsedTime,
      ...(outcome && { code: outcome.code }),
      ...(outcome?.err !== undefined && { err: outcome.err }),
      ...(outcome?.reason !== undefined && { reason: outcome.reason }),
    };
    if (error) reply.log.error({ ...line, err: error }, 'request errored');
    else reply.log[outcome?.level ?? 'info'](line, 'request completed');
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
          ignore: 'hostname,req,res,code',
          messageFormat:
            '{if req.method}{req.method} {req.url} {res.statusCode} {end}{if code}{code} {end}{msg}',
        }),
      }),
    },
    logController: new RequestLog(),
  };
}

{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "blinger-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Kept to 52 characters: the StatefulSet adds "-<ordinal>" to pod names and
the controller-revision-hash label adds another 11.
*/}}
{{- define "blinger-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "blinger-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blinger-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blinger-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "blinger-worker.labels" -}}
helm.sh/chart: {{ include "blinger-worker.chart" . }}
{{ include "blinger-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: blinger-worker
{{- end }}

{{- define "blinger-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "blinger-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the AMQP URL and the API token. */}}
{{- define "blinger-worker.secretName" -}}
{{- default (include "blinger-worker.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "blinger-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* worker.requestTimeout in whole seconds (rounded up): 10s, 1m, 1500ms, 1m30s. */}}
{{- define "blinger-worker.requestTimeoutSeconds" -}}
{{- $t := toString .Values.worker.requestTimeout }}
{{- if not (regexMatch "^([0-9]+(ms|s|m))+$" $t) }}
{{- fail (printf "worker.requestTimeout (%q) must be a duration such as 10s, 1500ms or 1m30s" $t) }}
{{- end }}
{{- $ms := 0 }}
{{- range (regexFindAll "[0-9]+(ms|s|m)" $t -1) }}
{{- $n := int64 (regexFind "^[0-9]+" .) }}
{{- if hasSuffix "ms" . }}{{- $ms = add $ms $n }}
{{- else if hasSuffix "s" . }}{{- $ms = add $ms (mul $n 1000) }}
{{- else }}{{- $ms = add $ms (mul $n 60000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
terminationGracePeriodSeconds: explicit, else the worker's whole shutdown budget (crates/blinger-worker/src/runtime/shutdown.rs
`budget`): shutdown grace + request timeout + 15 s; always above the shutdown grace.
*/}}
{{- define "blinger-worker.terminationGracePeriodSeconds" -}}
{{- $grace := int64 .Values.worker.shutdownGraceSeconds }}
{{- $tgps := add $grace (int64 (include "blinger-worker.requestTimeoutSeconds" .)) 15 }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $tgps = int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- if le $tgps $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than worker.shutdownGraceSeconds (%d), or in-flight jobs are killed before the worker can hand them back" $tgps $grace) }}
{{- end }}
{{- $tgps }}
{{- end }}

{{/*
Environment variables of the worker: name -> value (strings). Empty values are left out so the worker's
own default applies.
*/}}
{{- define "blinger-worker.workerEnv" -}}
{{- $w := .Values.worker }}
{{- $env := dict
  "BLINGER_API_URL" ($w.apiUrl | toString)
  "BLINGER_WORKER_METRICS_ADDR" (printf "0.0.0.0:%d" (int64 $w.metricsPort))
  "BLINGER_WORKER_CONCURRENCY" (int64 $w.concurrency | toString)
  "BLINGER_WORKER_KEYLESS_CONCURRENCY" (int64 $w.keylessConcurrency | toString)
  "BLINGER_WORKER_PREFETCH" (int64 $w.prefetch | toString)
  "BLINGER_WORKER_FAIR_SHARE" (int64 $w.fairShare | toString)
  "BLINGER_WORKER_RATE_LIMIT" (int64 $w.rateLimit | toString)
  "BLINGER_WORKER_RATE_BURST" (int64 $w.rateBurst | toString)
  "BLINGER_WORKER_QUEUE_TYPE" ($w.queueType | toString)
  "BLINGER_WORKER_EXCHANGE" ($w.exchange | toString)
  "BLINGER_WORKER_QUEUE" ($w.queue | toString)
  "BLINGER_WORKER_DEAD_LETTER_QUEUE" ($w.deadLetterQueue | toString)
  "BLINGER_WORKER_RECEIPTS" ($w.receipts | toString)
  "BLINGER_WORKER_RECEIPTS_EXCHANGE" ($w.receiptsExchange | toString)
  "BLINGER_WORKER_RETRY_DELAYS" ($w.retryDelays | toString)
  "BLINGER_WORKER_MAX_IN_PROCESS_ATTEMPTS" (int64 $w.maxInProcessAttempts | toString)
  "BLINGER_WORKER_DELIVERY_LIMIT" (int64 $w.deliveryLimit | toString)
  "BLINGER_WORKER_PARTITIONS" (int64 $w.partitions | toString)
  "BLINGER_WORKER_PARTITION_PREFETCH" (int64 $w.partitionPrefetch | toString)
  "BLINGER_WORKER_REQUEST_TIMEOUT" ($w.requestTimeout | toString)
  "BLINGER_WORKER_SHUTDOWN_GRACE" (printf "%ds" (int64 $w.shutdownGraceSeconds))
  "BLINGER_WORKER_RETENTION" ($w.retention | toString)
  "BLINGER_WORKER_MAX_BODY_BYTES" (int64 $w.maxBodyBytes | toString)
  "BLINGER_WORKER_LOG_FORMAT" ($w.logFormat | toString)
  "BLINGER_WORKER_LOG_LEVEL" ($w.logLevel | toString)
}}
{{- range $name := keys $env | sortAlpha }}
{{- $value := get $env $name }}
{{- if ne $value "" }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The queues holding the deployment's waiting jobs: the work queue; in partitioned mode
(worker.partitions > 0) also the router's input and the partition queues, where the jobs wait there.
*/}}
{{- define "blinger-worker.waitingQueuesRegex" -}}
{{- $q := regexQuoteMeta .Values.worker.queue }}
{{- printf "%s(\\.in|\\.unrouted|\\.p\\.[0-9]+)?" $q }}
{{- end }}

{{/*
PromQL matcher of the queue-depth alert's queues (prometheusRule.queueDepth.selector overrides it).
*/}}
{{- define "blinger-worker.queueDepthSelector" -}}
{{- if gt (int64 .Values.worker.partitions) 0 }}
{{- printf "queue=~%q" (include "blinger-worker.waitingQueuesRegex" .) }}
{{- else }}
{{- printf "queue=%q" .Values.worker.queue }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers: joins the non-empty strings of the list given with "," and wraps them in braces;
nothing when all are empty.
*/}}
{{- define "blinger-worker.promSel" -}}
{{- $parts := list }}
{{- range . }}{{ if . }}{{ $parts = append $parts . }}{{ end }}{{ end }}
{{- if $parts }}{{ printf "{%s}" (join "," $parts) }}{{ end }}
{{- end }}

{{/*
The alert rule groups, shared by prometheusrule.yaml and (rendered with default values) by
deploy/prometheus/blinger-worker-rules.yaml. Alert templates ({{ $value }}, {{ $labels }}) are escaped
from Helm with backquoted strings.
*/}}
{{- define "blinger-worker.ruleGroups" -}}
{{- $r := .Values.prometheusRule }}
{{- $ws := $r.workerSelector }}
{{- $sel := include "blinger-worker.promSel" (list $ws) }}
{{- $queueSel := default (include "blinger-worker.queueDepthSelector" .) $r.queueDepth.selector }}
{{- $extra := $r.additionalRuleLabels }}
groups:
  - name: blinger-worker
    rules:
      - alert: BlingerWorkerNoDeliveries
        expr: |-
          sum({{ $r.queueDepth.metric }}{{ include "blinger-worker.promSel" (list $queueSel) }}) > 0
          and on()
          (sum(increase(blinger_worker_jobs_delivered_total{{ $sel }}[10m])) or vector(0)) == 0
        for: {{ $r.noDeliveries.for }}
        labels:
          severity: {{ $r.noDeliveries.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: Jobs are waiting in the work queue but blinger-worker delivered none for 10 minutes.
          description: >-
            {{ `{{ $value }}` }} messages are ready in the work queue
            ({{ $r.queueDepth.metric }}{{ include "blinger-worker.promSel" (list $queueSel) }}) and no job was
            delivered to Blinger in the last 10 minutes. Check that worker pods are running and ready
            (paused on a 401/403? broker disconnected?) and their logs. Assumption: the queue depth comes
            from RabbitMQ's rabbitmq_prometheus plugin with per-object metrics enabled (a `queue` label
            on rabbitmq_queue_messages_ready), or the /metrics/detailed endpoint
            (rabbitmq_detailed_queue_messages_ready); the metric and selector are chart values
            (prometheusRule.queueDepth). Without those metrics this alert never fires.
      - alert: BlingerWorkerDeadLetters
        expr: |-
          sum by (reason) (rate(blinger_worker_jobs_dead_lettered_total{{ $sel }}[10m])) > {{ $r.deadLetters.threshold }}
        for: {{ $r.deadLetters.for }}
        labels:
          severity: {{ $r.deadLetters.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: blinger-worker is dead-lettering jobs (reason {{ `{{ $labels.reason }}` }}).
          description: >-
            {{ `{{ $value | humanize }}` }} jobs/s dead-lettered with reason {{ `{{ $labels.reason }}` }} over the
            last 10 minutes (threshold {{ $r.deadLetters.threshold }}/s). invalid: publishers send malformed
            jobs; rejected: Blinger refused them (4xx); retries-exhausted: Blinger failing for long;
            expired: jobs delivered too late. Inspect the x-blinger-reason / x-blinger-error headers in
            the {{ .Values.worker.deadLetterQueue }} queue.
      - alert: BlingerWorkerApiErrorRatio
        expr: |-
          sum(rate(blinger_worker_api_requests_total{{ include "blinger-worker.promSel" (list `status=~"5..|error|timeout"` $ws) }}[5m]))
          /
          sum(rate(blinger_worker_api_requests_total{{ $sel }}[5m]))
          > {{ $r.apiErrorRatio.threshold }}
        for: {{ $r.apiErrorRatio.for }}
        labels:
          severity: {{ $r.apiErrorRatio.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: Many Blinger API requests fail (5xx, transport errors, timeouts).
          description: >-
            {{ `{{ $value | humanizePercentage }}` }} of Blinger API requests over the last 5 minutes were
            answered 5xx or failed with a transport error or timeout (threshold
            {{ $r.apiErrorRatio.threshold }}). Jobs are being retried through the delay tiers; if this
            lasts they end up dead-lettered as retries-exhausted.
      - alert: BlingerWorkerPausedOnAuth
        expr: |-
          max_over_time(blinger_worker_paused{{ $sel }}[1m]) == 1
        for: {{ $r.paused.for }}
        labels:
          severity: {{ $r.paused.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: blinger-worker {{ `{{ $labels.instance }}` }} is paused because Blinger answered 401/403.
          description: >-
            The worker stopped taking jobs (they stay queued, nothing is dead-lettered) because the Blinger
            API refused its token. Fix or rotate the API token in the worker's Secret; the worker re-reads
            the mounted token file and resumes by itself.
      - alert: BlingerWorkerBrokerDisconnected
        expr: |-
          min_over_time(blinger_worker_amqp_connected{{ $sel }}[1m]) == 0
        for: {{ $r.brokerDisconnected.for }}
        labels:
          severity: {{ $r.brokerDisconnected.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: blinger-worker {{ `{{ $labels.instance }}` }} is not connected to RabbitMQ.
          description: >-
            The worker has had no broker connection for at least {{ $r.brokerDisconnected.for }}. It keeps
            reconnecting with capped backoff; check RabbitMQ's health, the AMQP URL and credentials
            in the worker's Secret, and network policies.
      - alert: BlingerWorkerDeliveryLatencyHigh
        expr: |-
          histogram_quantile(0.99, sum by (le) (rate(blinger_worker_delivery_latency_seconds_bucket{{ $sel }}[10m])))
          > {{ $r.latencyP99.thresholdSeconds }}
        for: {{ $r.latencyP99.for }}
        labels:
          severity: {{ $r.latencyP99.severity }}
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: blinger-worker p99 delivery latency is high.
          description: >-
            p99 of the time from publish (AMQP timestamp, else first receipt) to delivery is
            {{ `{{ $value | humanizeDuration }}` }} over the last 10 minutes (threshold
            {{ $r.latencyP99.thresholdSeconds }}s). Causes: a backlog (scale up, or raise concurrency or
            the rate limit), Blinger slow or rate-limiting (429), or many jobs going through retry tiers.
{{- end }}

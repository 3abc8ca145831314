import { pipelineSuite } from './suite.ts';

pipelineSuite('the in-process bus', () => ({ kind: 'inproc' }));
